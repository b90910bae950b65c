-- wrk script: POST one fixed body to the URL's path; print the results as one JSON line.
--   wrk -t1 -c64 -d10s -s bench/wrk/post.lua http://127.0.0.1:8000/path -- BODY_FILE [HEADER=VALUE ...]
-- BODY_FILE holds the exact request body (read once, sent by every request);
-- each HEADER=VALUE argument adds a request header (e.g. Content-Type=application/json).

function init(args)
  local file = assert(io.open(args[1], "rb"))
  wrk.method = "POST"
  wrk.body = file:read("*a")
  file:close()
  for i = 2, #args do
    local name, value = args[i]:match("^([^=]+)=(.*)$")
    wrk.headers[name] = value
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "bytes": %d, "p50_us": %d, "p90_us": %d, ' ..
    '"p99_us": %d, "max_us": %d, "connect_errors": %d, "read_errors": %d, ' ..
    '"write_errors": %d, "status_errors": %d, "timeouts": %d}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
