"""``foldserve_pending_requests``, the signal to scale on, in a real server of two worker
processes: the requests of a model in progress or in line, summed over the workers, and
back to 0 once they are answered."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tests.polling import poll
from tests.servers import ENDLESS_HOLD_US, parse_metrics, v2_body, value

REQUESTS = 6


def test_pending_requests_are_summed_over_the_workers(
    model_store: Any, tmp_path: Path, serve_process: Any
) -> None:
    repo = model_store.copy_to(tmp_path / "models")
    # digits_cnn's requests wait in the batching queue (admitted, so pending) until the
    # server's request timeout answers them 503.
    (repo / "digits_cnn" / "config.json").write_text(
        json.dumps({"dynamic_batching": {"max_queue_delay_microseconds": ENDLESS_HOLD_US}})
    )
    body = v2_body(np.zeros((1, 1, 8, 8), np.float32))
    with serve_process(repo, 2, "--request-timeout-ms", "5000") as server:

        def pending() -> float:
            samples = parse_metrics(server.client.get("/metrics").text)
            return value(samples, "foldserve_pending_requests", model="digits_cnn")

        def post(_: int) -> int:  # each on a new connection: spread over the workers
            url = f"{server.url}/v2/models/digits_cnn/infer"
            return httpx.post(url, json=body, timeout=30).status_code

        assert pending() == 0
        with ThreadPoolExecutor(REQUESTS) as pool:
            answers = pool.map(post, range(REQUESTS))
            poll(lambda: pending() == REQUESTS, limit=4.0)  # before the timeout answers them
            statuses = list(answers)
        assert statuses == [503] * REQUESTS  # the request timeout, uncomputed
        poll(lambda: pending() == 0, limit=5.0)
