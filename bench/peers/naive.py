"""The baseline a user would write: FastAPI, a pydantic request model, ONNX Runtime, no batching.

    python bench/peers/naive.py --repository models --port 8002 [--workers 1]

It serves ``POST /v2/models/{name}/infer`` (the V2 JSON body, first input
only) for the highest version of every model in the repository, with an
ONNX Runtime session at its default options. Every request is validated
element by element by pydantic, run alone, and answered through FastAPI's
``jsonable_encoder``, as the FastAPI tutorials do.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

REPOSITORY_ENV = "NAIVE_REPOSITORY"


class Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float]


class InferRequest(BaseModel):
    inputs: list[Tensor]


def latest_model(model_dir: Path) -> Path:
    versions = [p for p in model_dir.iterdir() if p.name.isdigit()]
    return max(versions, key=lambda p: int(p.name)) / "model.onnx"


def create_app(repository: Path) -> FastAPI:
    sessions = {
        d.name: ort.InferenceSession(str(latest_model(d)), providers=["CPUExecutionProvider"])
        for d in sorted(repository.iterdir())
        if d.is_dir() and not d.name.startswith(".")
    }
    app = FastAPI()

    @app.post("/v2/models/{name}/infer")
    def infer(name: str, request: InferRequest) -> dict[str, Any]:
        session = sessions.get(name)
        if session is None:
            raise HTTPException(404, f"unknown model {name}")
        tensor = request.inputs[0]
        x = np.asarray(tensor.data, dtype=np.float32).reshape(tensor.shape)
        results = session.run(None, {session.get_inputs()[0].name: x})
        outputs = [
            {"name": o.name, "datatype": "FP32", "shape": list(y.shape), "data": y.ravel().tolist()}
            for o, y in zip(session.get_outputs(), results, strict=True)
        ]
        return {"model_name": name, "outputs": outputs}

    return app


def app_from_env() -> FastAPI:
    """Factory for uvicorn workers: the repository comes from $NAIVE_REPOSITORY."""
    return create_app(Path(os.environ[REPOSITORY_ENV]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    os.environ[REPOSITORY_ENV] = str(args.repository.resolve())
    uvicorn.run(
        "naive:app_from_env",
        factory=True,
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
