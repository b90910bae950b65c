"""The HTTP floor: a bare FastAPI endpoint on uvicorn that answers every POST with a constant.

    python bench/peers/floor.py --port 8001 [--workers 1]

It reads no body and runs no model: what any FastAPI/uvicorn server costs per
request before it does anything, on the same event loop and HTTP parser as
FoldServe (uvloop, httptools) and without an access log.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Response

ANSWER = b'{"model_name":"floor","outputs":[]}'

app = FastAPI()


@app.post("/v2/models/{name}/infer")
async def infer(name: str) -> Response:
    return Response(ANSWER, media_type="application/json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    uvicorn.run(
        "floor:app",
        app_dir=str(Path(__file__).parent),
        host=args.host,
        port=args.port,
        workers=args.workers,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
