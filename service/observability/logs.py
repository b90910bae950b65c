"""Logging: text or JSON lines, each carrying the request id, written off the event loop.

The request id lives in a context variable set by the request middleware; it is
copied into worker threads with the rest of the context, so log lines written
while a request is handled (inference included) name that request. Request ids
the server makes up are a per-process random prefix and a counter
(:func:`new_request_id`): unique across requests and worker processes, and a
tenth of uuid4's cost.

:func:`configure_logging` gives each process one :class:`LogWriter`: a thread
that formats and writes the process's lines in batches (one ``write`` per
``FLUSH_INTERVAL_S``). A log call on the event loop only appends to a deque;
the access line of a request is not even a ``LogRecord`` (a tuple, formatted
by the writer into the same layout as every other line). This is the stdlib's
``QueueHandler``/``QueueListener`` pattern made cheaper: no record and no
thread wake-up per request, and one system call per batch rather than per line
(``docs/throughput.md`` has the measurements). The writer is flushed when the
app shuts down and at exit, so a drained worker loses no line.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import secrets
import sys
import threading
import time
from collections import deque
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any

import orjson

request_id_var: ContextVar[str] = ContextVar("foldserve_request_id", default="-")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
ACCESS_LOGGER = "service.access"
FLUSH_INTERVAL_S = 0.05  # lines reach the stream at most this late
MAX_PENDING = 100_000  # lines held while the stream is slower than the server; dropped beyond


class RequestIds:
    """``<16 hex digits of this process>-<counter in hex>``; a forked child draws a new prefix."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.prefix = secrets.token_hex(8) + "-"
        self.counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):x}"


new_request_id = RequestIds()


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (``-`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def _iso_time(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id[, exc_info]."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": _iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc_info"] = record.exc_text
        return orjson.dumps(entry).decode()


# An access entry: (time.time(), method, path, status, milliseconds, request id).
AccessEntry = tuple[float, str, str, int, float, str]


class LogWriter:
    """This process's log lines, formatted and written by one thread in batches."""

    def __init__(self, stream: IO[str], log_format: str) -> None:
        self.stream = stream
        self.json = log_format == "json"
        self.formatter = JsonFormatter() if self.json else logging.Formatter(TEXT_FORMAT)
        self.pending: deque[logging.LogRecord | AccessEntry] = deque()
        self.dropped = 0
        self._write_lock = threading.Lock()  # the thread and flush() callers, one at a time
        self._stopped = threading.Event()
        self._second = -1
        self._second_text = ("", "")  # local (text lines), UTC (JSON lines)
        self._thread = self._start()
        os.register_at_fork(after_in_child=self._after_fork)

    def _start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="foldserve-log", daemon=True)
        thread.start()
        return thread

    def _after_fork(self) -> None:
        """A forked child (a pre-forking server) has no writer thread: start its own, and
        leave the parent's queued lines to the parent."""
        self.pending.clear()
        self._write_lock = threading.Lock()
        if not self._stopped.is_set():
            self._thread = self._start()

    def add(self, item: logging.LogRecord | AccessEntry) -> None:
        """Queue one line (any thread; a deque append is atomic)."""
        if len(self.pending) < MAX_PENDING:
            self.pending.append(item)
        else:
            self.dropped += 1

    def access(self, method: str, path: str, status: int, ms: float, request_id: str) -> None:
        self.add((time.time(), method, path, status, ms, request_id))

    def _run(self) -> None:
        while not self._stopped.wait(FLUSH_INTERVAL_S):
            self.flush()

    def flush(self) -> None:
        """Write every queued line now (one write call)."""
        with self._write_lock:
            lines = []
            take = self.pending.popleft
            for _ in range(len(self.pending)):
                item = take()
                lines.append(self._access_line(item) if type(item) is tuple else self._line(item))
            if self.dropped:
                lines.append(f"{self.dropped} log lines dropped: the log stream is too slow")
                self.dropped = 0
            if not lines:
                return
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except (OSError, ValueError):  # a closed or broken stream: nowhere left to say so
                pass

    def stop(self) -> None:
        """Stop the thread and write what is left (idempotent)."""
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.flush()

    def _line(self, record: logging.LogRecord | AccessEntry) -> str:
        assert isinstance(record, logging.LogRecord)
        try:
            return self.formatter.format(record)
        except Exception as err:  # a bad format string must not stop the other lines
            return f"unformattable log record from {record.name}: {err!r}"

    def _access_line(self, entry: Any) -> str:
        created, method, path, status, ms, request_id = entry
        message = f'"{method} {path}" {status} {ms:.2f}ms'
        second = int(created)
        if second != self._second:  # the date and time to the second, built once per second
            self._second = second
            local = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            utc = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._second_text = (local, utc)
        millis = int((created - second) * 1000)  # as logging.Formatter's msecs
        if self.json:
            return orjson.dumps(
                {
                    "time": f"{self._second_text[1]}.{millis:03d}+00:00",
                    "level": "INFO",
                    "logger": ACCESS_LOGGER,
                    "message": message,
                    "request_id": request_id,
                    "method": method,
                    "path": path,
                    "status": status,
                    "duration_ms": round(ms, 2),
                }
            ).decode()
        # logging.Formatter's asctime
        return f"{self._second_text[0]},{millis:03d} INFO {ACCESS_LOGGER} [{request_id}] {message}"


class WriterHandler(logging.Handler):
    """The root handler: stamps the request id, merges the message, queues the record."""

    def __init__(self, writer: LogWriter) -> None:
        super().__init__()
        self.writer = writer
        self.addFilter(RequestIdFilter())

    def emit(self, record: logging.LogRecord) -> None:
        # As QueueHandler.prepare: the arguments and traceback may change or go away before
        # the writer runs, so the message and traceback text are fixed here (rare lines).
        try:
            record.msg = record.getMessage()
            record.args = None
            if record.exc_info:
                record.exc_text = self.writer.formatter.formatException(record.exc_info)
                record.exc_info = None
        except Exception:
            self.handleError(record)
            return
        self.writer.add(record)


_writer: LogWriter | None = None
_access_log = logging.getLogger(ACCESS_LOGGER)


def log_access(method: str, path: str, status: int, ms: float, request_id: str) -> None:
    """One access line (INFO on ``service.access``): straight to the writer that
    :func:`configure_logging` installed, or, when there is none or the access logger has
    handlers of its own (a test's, an embedding app's), as an ordinary log record."""
    if not _access_log.isEnabledFor(logging.INFO):
        return
    writer = _writer
    if writer is not None and not _access_log.handlers:
        writer.access(method, path, status, ms, request_id)
    else:
        _access_log.info('"%s %s" %d %.2fms', method, path, status, ms)


def flush_logs() -> None:
    """Write every queued line now (the app's shutdown calls it)."""
    if _writer is not None:
        _writer.flush()


def configure_logging(log_format: str, level: str, stream: IO[str] | None = None) -> LogWriter:
    """Replace the root handlers with one that queues to a new :class:`LogWriter` on
    ``stream`` (default stderr) in the chosen format; a previous writer is stopped."""
    global _writer
    if _writer is not None:
        _writer.stop()
    writer = LogWriter(stream or sys.stderr, log_format)
    root = logging.getLogger()
    root.handlers[:] = [WriterHandler(writer)]
    root.setLevel(level.upper())
    # uvicorn's loggers propagate to the root handler; its access log is replaced by ours.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    _writer = writer
    atexit.register(writer.stop)
    return writer
