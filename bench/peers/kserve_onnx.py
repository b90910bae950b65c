"""The peer: KServe's ModelServer with a custom model running the same ONNX file in ONNX Runtime.

    bench/.venv-kserve/bin/python bench/peers/kserve_onnx.py --repository models \
        --http_port 8003 --enable_grpc false --configure_logging false \
        --enable_latency_logging false --workers 1

Run it with the ``kserve`` package's own environment (bench/throughput.py
creates bench/.venv-kserve): kserve pins its own FastAPI, uvicorn and pydantic.
Each model directory becomes a ``kserve.Model`` written as KServe's custom
model guide shows (a synchronous ``predict`` on the V2 ``InferRequest``),
served at ``/v2/models/{name}/infer``. KServe reads its own flags
(``--http_port`` ...) from the command line; this script adds ``--repository``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import kserve
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse


def latest_model(model_dir: Path) -> Path:
    versions = [p for p in model_dir.iterdir() if p.name.isdigit()]
    return max(versions, key=lambda p: int(p.name)) / "model.onnx"


class OnnxModel(kserve.Model):  # type: ignore[misc]
    def __init__(self, name: str, path: Path) -> None:
        super().__init__(name)
        self.path = path
        self.session: ort.InferenceSession | None = None
        self.load()

    def __getstate__(self) -> dict[str, object]:
        # KServe's multi-worker server pickles its models into each worker: the session
        # cannot be pickled, so each worker opens its own.
        return {**self.__dict__, "session": None}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self.load()

    def load(self) -> bool:
        self.session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        self.ready = True
        return True

    def predict(
        self, payload: InferRequest, headers: dict[str, str] | None = None
    ) -> InferResponse:
        assert self.session is not None
        x = payload.inputs[0].as_numpy()
        results = self.session.run(None, {self.session.get_inputs()[0].name: x})
        outputs = [
            InferOutput(name=o.name, shape=list(y.shape), datatype="FP32", data=y)
            for o, y in zip(self.session.get_outputs(), results, strict=True)
        ]
        return InferResponse(
            model_name=self.name, infer_outputs=outputs, response_id=payload.id or ""
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Path("models"))
    args, _ = parser.parse_known_args()  # the rest are KServe's own flags
    models = [
        OnnxModel(d.name, latest_model(d))
        for d in sorted(args.repository.iterdir())
        if d.is_dir() and not d.name.startswith(".")
    ]
    kserve.ModelServer().start(models)


if __name__ == "__main__":
    main()
