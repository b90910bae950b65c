// FoldServe UI: the models, and folded vs unfolded latency of one of them.
// Plain JS, no dependencies; the chart is SVG built here. Everything comes from
// this server's own API (/v2/repository/index, /v2/models/..., .../fold-latency).
"use strict";

const BINS = 40; // histogram bins per variant (the chart has BINS bars per variant)
const SVG_NS = "http://www.w3.org/2000/svg";
const VARIANTS = ["folded", "unfolded"];
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmt(x, digits = 3) {
  if (x === null || x === undefined) return "n/a";
  if (x === 0) return "0";
  const a = Math.abs(x);
  if (a >= 1000) return x.toFixed(0);
  return Number(x.toPrecision(digits)).toString();
}

function headers() {
  const key = $("api_key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

async function getJSON(path) {
  const response = await fetch(path, { headers: headers() });
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = { error: `HTTP ${response.status}` };
  }
  if (!response.ok) {
    const retry = response.headers.get("Retry-After");
    const extra = retry ? ` (retry in ${retry} s)` : "";
    throw new Error(`${response.status}: ${(body && body.error) || "request failed"}${extra}`);
  }
  return body;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

// -- models ----------------------------------------------------------------

const models = new Map(); // name -> {versions: [..ready..], state, meta}

async function loadModels() {
  const server = await getJSON("/v2");
  $("server").textContent = `${server.name} ${server.version}`;
  const index = await getJSON("/v2/repository/index");
  for (const row of index) {
    const m = models.get(row.name) || { versions: [], states: [], meta: null };
    m.states.push(row.state);
    if (row.state === "READY" && row.version) m.versions.push(row.version);
    models.set(row.name, m);
  }
  await Promise.all(
    [...models.entries()]
      .filter(([, m]) => m.versions.length > 0)
      .map(async ([name, m]) => {
        m.meta = await getJSON(`/v2/models/${encodeURIComponent(name)}`);
      }),
  );
  renderModels();
}

function renderModels() {
  const body = $("models").tBodies[0];
  body.replaceChildren();
  const select = $("model");
  select.replaceChildren();
  for (const [name, m] of [...models.entries()].sort()) {
    const ready = m.versions.length > 0;
    const tr = el("tr", { "data-model": name });
    tr.append(
      el("td", {}, m.meta && m.meta.derived_from ? `${name} (from ${m.meta.derived_from.file})` : name),
      el("td", {}, m.versions.join(", ") || "none"),
      el("td", {}, ready ? "READY" : "UNAVAILABLE"),
      el("td", {}, m.meta ? m.meta.provider : ""),
      el("td", {}, m.meta ? `${m.meta.bn_nodes.folded ?? "?"} / ${m.meta.bn_nodes.unfolded ?? "?"}` : ""),
    );
    body.append(tr);
    if (ready) select.append(el("option", { value: name }, name));
  }
  if (!body.children.length) {
    const tr = el("tr");
    tr.append(el("td", { colspan: 5, class: "muted" }, "no models in the repository"));
    body.append(tr);
  }
  renderVersions();
}

function renderVersions() {
  const m = models.get($("model").value);
  const select = $("version");
  select.replaceChildren(el("option", { value: "" }, "latest"));
  for (const v of (m ? m.versions : []).slice().reverse()) {
    select.append(el("option", { value: v }, v));
  }
}

// -- measuring -------------------------------------------------------------

function reportURL(cached) {
  const name = encodeURIComponent($("model").value);
  const q = new URLSearchParams({ samples: "true" });
  if (cached) {
    q.set("cached", "true");
  } else {
    for (const id of ["batch_size", "iterations", "warmup"]) q.set(id, $(id).value);
    if ($("isolate").checked) q.set("isolate", "true");
    if ($("int8").checked) q.set("int8", "true");
    if ($("version").value) q.set("version", $("version").value);
  }
  return `/v2/models/${name}/fold-latency?${q}`;
}

async function fetchReport(cached) {
  if (!$("model").value) return;
  showError("");
  for (const b of [$("run"), $("last")]) b.disabled = true;
  $("status").textContent = cached ? "loading the last report..." : "measuring...";
  try {
    const report = await getJSON(reportURL(cached));
    renderReport(report);
    $("status").textContent = `${report.cached ? "last report" : "measured"} ${report.measured_at}`;
  } catch (err) {
    $("status").textContent = "";
    showError(err.message);
  } finally {
    for (const b of [$("run"), $("last")]) b.disabled = false;
  }
}

// -- the report ------------------------------------------------------------

function renderReport(r) {
  $("report").hidden = false;
  const [low, high] = r.speedup.ci95;
  $("speedup").textContent =
    `speedup ${r.speedup.ratio.toFixed(3)}x (95% CI ${low.toFixed(3)}-${high.toFixed(3)})`;
  $("verdict").textContent = `${r.model_name} v${r.model_version}: ${r.verdict}`;
  $("bound").textContent = r.bound
    ? `bound: ${r.bound.max_speedup ? `${r.bound.max_speedup.toFixed(3)}x` : "n/a"} (${r.bound.description})`
    : "";
  $("int8_speedup").hidden = !r.int8_speedup;
  if (r.int8_speedup) {
    const [l8, h8] = r.int8_speedup.ci95;
    $("int8_speedup").textContent =
      `int8 speedup over folded FP32 ${r.int8_speedup.ratio.toFixed(3)}x ` +
      `(95% CI ${l8.toFixed(3)}-${h8.toFixed(3)}): ${r.int8_verdict}; ` +
      `max abs diff ${fmt(r.int8_max_abs_diff)}`;
  }
  $("case").textContent = r.case_description;
  $("saving").textContent =
    `saving per call: ${fmt(r.saving_us_per_call, 3)} us; per sample: ${fmt(r.saving_us_per_sample, 3)} us` +
    (r.end_to_end ? `; end-to-end request p50: ${fmt(r.end_to_end.p50_ms, 3)} ms (${r.end_to_end.requests} requests)` : "");
  $("scale").textContent = r.scale;
  $("scope").textContent = r.scope;

  const body = $("variants").tBodies[0];
  body.replaceChildren();
  for (const v of r.int8 ? [...VARIANTS, "int8"] : VARIANTS) {
    const s = r[v];
    const name = el("td");
    name.append(el("span", { class: "swatch", style: `background: var(--${v})` }), v);
    const tr = el("tr", { "data-variant": v });
    tr.append(name, el("td", {}, s.file), el("td", { class: "num" }, String(s.bn_nodes)));
    for (const key of ["p50_ms", "p90_ms", "p99_ms", "mean_ms", "samples_per_s"]) {
      tr.append(el("td", { class: "num" }, fmt(s[key], 4)));
    }
    body.append(tr);
  }

  const facts = [
    ["provider", `${r.provider} (${r.threads} threads)`],
    ["graph optimizations", r.graph_optimization_level],
    ["batch / iterations / warm-up", `${r.batch_size} / ${r.iterations_completed}${r.time_limited ? ` of ${r.iterations} (time limit)` : ""} / ${r.warmup}`],
    ["max abs diff", fmt(r.max_abs_diff)],
    ["BN inputs (unfolded)", JSON.stringify(r.unfolded_bn_inputs)],
    ["BN after ORT (unfolded)", r.unfolded_bn_nodes_after_ort ?? "n/a"],
    ["machine", `${r.machine.cpu} (${r.machine.cpu_count} CPUs)${r.machine.gpu ? `, ${r.machine.gpu}` : ""}`],
    ["load average", (r.machine.load_average || []).map((x) => x.toFixed(2)).join(" ")],
  ];
  const dl = $("facts");
  dl.replaceChildren();
  for (const [k, v] of facts) dl.append(el("dt", {}, k), el("dd", {}, String(v)));

  const chart = $("chart");
  chart.replaceChildren(intervalChart(r.speedup));
  if (r.samples_ms) chart.append(histogramChart(r));
}

// The speedup and its 95% interval on a ratio axis that always shows 1 (no difference).
function intervalChart(speedup) {
  const W = 900, H = 56, left = 70, right = 20, y = 22;
  const [low, high] = speedup.ci95;
  const pad = Math.max(0.02, (high - low) * 0.5);
  const lo = Math.min(0.95, low - pad), hi = Math.max(1.05, high + pad);
  const x = (v) => left + ((v - lo) / (hi - lo)) * (W - left - right);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "interval", role: "img",
    "aria-label": "speedup with its 95% confidence interval" });
  root.append(svg("line", { class: "axis", x1: left, x2: W - right, y1: y + 12, y2: y + 12 }));
  root.append(svg("line", { class: "one", x1: x(1), x2: x(1), y1: 4, y2: y + 12 }));
  root.append(svg("text", { x: x(1), y: H - 4, "text-anchor": "middle" }, "1.0 (no gain)"));
  root.append(svg("text", { x: left - 8, y: y + 4, "text-anchor": "end" }, "speedup"));
  root.append(svg("rect", { class: "ci", x: x(low), y: y - 5, width: Math.max(1, x(high) - x(low)), height: 10 }));
  root.append(svg("circle", { class: "ratio", cx: x(speedup.ratio), cy: y, r: 5 }));
  root.append(svg("text", { x: x(speedup.ratio), y: y - 9, "text-anchor": "middle" },
    `${speedup.ratio.toFixed(3)}x`));
  for (const v of [lo, hi]) {
    root.append(svg("text", { x: x(v), y: H - 4, "text-anchor": "middle" }, v.toFixed(2)));
  }
  return root;
}

function quantile(sorted, q) {
  const pos = (sorted.length - 1) * q;
  const i = Math.floor(pos);
  return sorted[i] + (sorted[Math.min(i + 1, sorted.length - 1)] - sorted[i]) * (pos - i);
}

// Two stacked histograms on one latency axis: folded above, unfolded below, each with its p50.
// Slower runs than the axis shows go into the last bin (marked "+" on the axis).
function histogramChart(r) {
  const W = 900, panelH = 140, left = 70, right = 20, top = 24, gap = 34, bottom = 40;
  const H = top + 2 * panelH + gap + bottom;
  const all = [...r.samples_ms.folded, ...r.samples_ms.unfolded].sort((a, b) => a - b);
  const lo = all[0];
  // Up to the 99th percentile, at most 4 (p90 - p50) past the median, past both p50s:
  // a long tail of slow runs would otherwise squash the bars into a corner.
  const q50 = quantile(all, 0.5), q90 = quantile(all, 0.9);
  let hi = Math.min(quantile(all, 0.99), q50 + 4 * Math.max(q90 - q50, 0.02 * q50));
  hi = Math.max(hi, 1.05 * Math.max(r.folded.p50_ms, r.unfolded.p50_ms));
  if (!(hi > lo)) hi = lo + Math.max(lo * 0.01, 1e-6);
  const width = (hi - lo) / BINS;
  const x = (ms) => left + ((ms - lo) / (hi - lo)) * (W - left - right);
  const counts = {};
  for (const v of VARIANTS) {
    counts[v] = new Array(BINS).fill(0);
    for (const ms of r.samples_ms[v]) {
      counts[v][Math.min(BINS - 1, Math.max(0, Math.floor((ms - lo) / width)))] += 1;
    }
  }
  const peak = Math.max(1, ...counts.folded, ...counts.unfolded);
  const root = svg("svg", {
    viewBox: `0 0 ${W} ${H}`, role: "img", "data-bins": BINS,
    "aria-label": `latency histograms of ${r.model_name}: folded and unfolded`,
  });
  root.append(svg("title", {}, `Per-run latency, ${r.iterations_completed} runs per variant`));
  VARIANTS.forEach((v, row) => {
    const y0 = top + row * (panelH + gap); // panel top
    const base = y0 + panelH;
    const g = svg("g", { class: `panel ${v}` });
    g.append(svg("line", { class: "grid", x1: left, x2: W - right, y1: y0, y2: y0 }));
    g.append(svg("text", { x: left - 8, y: y0 + 4, "text-anchor": "end" }, String(peak)));
    g.append(svg("text", { x: left - 8, y: base, "text-anchor": "end" }, "0"));
    for (let i = 0; i < BINS; i++) {
      const h = (counts[v][i] / peak) * panelH;
      g.append(svg("rect", {
        class: `bar ${v}`, "data-count": counts[v][i],
        x: x(lo + i * width) + 0.5, y: base - h,
        width: Math.max(0.5, x(lo + width) - x(lo) - 1), height: h,
      }));
    }
    const p50 = r[v].p50_ms;
    const px = Math.min(W - right, Math.max(left, x(p50)));
    g.append(svg("line", { class: `p50 ${v}`, x1: px, x2: px, y1: y0 - 4, y2: base }));
    g.append(svg("text", { class: "label", x: W - right - 4, y: y0 + 12, "text-anchor": "end" },
      `${v} (${r[v].bn_nodes} BN nodes)`));
    g.append(svg("text", { x: px + 4, y: y0 + 6 }, `p50 ${fmt(p50)} ms`));
    g.append(svg("line", { class: "axis", x1: left, x2: W - right, y1: base, y2: base }));
    root.append(g);
  });
  const axisY = top + 2 * panelH + gap;
  for (let t = 0; t <= 5; t++) {
    const ms = lo + ((hi - lo) * t) / 5;
    const label = t === 5 && all[all.length - 1] > hi ? `${fmt(ms)}+` : fmt(ms);
    root.append(svg("line", { class: "axis", x1: x(ms), x2: x(ms), y1: axisY, y2: axisY + 4 }));
    root.append(svg("text", { x: x(ms), y: axisY + 16, "text-anchor": "middle" }, label));
  }
  root.append(svg("text", { x: (left + W - right) / 2, y: H - 6, "text-anchor": "middle" },
    `latency per call (ms), batch ${r.batch_size}`));
  root.append(svg("text", {
    x: 14, y: top + panelH + gap / 2, "text-anchor": "middle",
    transform: `rotate(-90 14 ${top + panelH + gap / 2})`,
  }, "runs"));
  return root;
}

// -- start -----------------------------------------------------------------

async function main() {
  const params = new URLSearchParams(location.search);
  for (const id of ["batch_size", "iterations", "warmup"]) {
    if (params.has(id)) $(id).value = params.get(id);
  }
  $("isolate").checked = params.get("isolate") === "true";
  $("int8").checked = params.get("int8") === "true";
  $("api_key").value = sessionStorage.getItem("foldserve-api-key") || "";
  $("api_key").addEventListener("change", () =>
    sessionStorage.setItem("foldserve-api-key", $("api_key").value.trim()));
  $("model").addEventListener("change", renderVersions);
  $("measure-form").addEventListener("submit", (event) => {
    event.preventDefault();
    fetchReport(false);
  });
  $("last").addEventListener("click", () => fetchReport(true));
  try {
    await loadModels();
  } catch (err) {
    showError(`cannot list the models: ${err.message}`);
    return;
  }
  if (params.has("model") && models.has(params.get("model"))) {
    $("model").value = params.get("model");
    renderVersions();
    if (params.has("version")) $("version").value = params.get("version");
  }
  // ?run=measure measures at once, ?run=cached shows the last report (links, tests).
  if (params.get("run") === "measure") await fetchReport(false);
  else if (params.get("run") === "cached") await fetchReport(true);
  document.body.dataset.ready = "true";
}

main();
