"""The closest peer: Seldon MLServer, a custom runtime running the same file in ONNX Runtime.

    bench/.venv-mlserver/bin/python bench/peers/mlserver_onnx.py --repository models --port 8004

Run it with MLServer's own environment (bench/throughput.py creates
bench/.venv-mlserver, with ``uvloop<0.22``: MLServer 1.7 does not start with
uvloop 0.22). The runtime, :class:`OnnxRuntime`, is written as MLServer's
custom-runtime guide shows: an ``MLModel`` whose async ``load`` opens the file
named by ``parameters.uri`` and whose async ``predict`` decodes the V2 request
with ``NumpyCodec``, runs the session and encodes each output back. This
script writes MLServer's ``settings.json`` (ports, and ``parallel_workers`` with
``--workers``; everything else MLServer's defaults: one inference worker
process, adaptive batching off) and one ``model-settings.json`` per model of
the repository into a temporary folder, then becomes ``mlserver start`` on that
folder. MLServer serves gRPC as well as REST: ``--grpc-port`` picks its port.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

HERE = Path(__file__).resolve().parent


class OnnxRuntime(MLModel):  # type: ignore[misc]
    async def load(self) -> bool:
        uri = self.settings.parameters.uri
        self._session = ort.InferenceSession(uri, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        results = self._session.run(None, {self._input: x})
        outputs = [
            NumpyCodec.encode_output(name=o.name, payload=y)
            for o, y in zip(self._session.get_outputs(), results, strict=True)
        ]
        return InferenceResponse(model_name=self.name, id=payload.id, outputs=outputs)


def latest_model(model_dir: Path) -> Path:
    versions = [p for p in model_dir.iterdir() if p.name.isdigit()]
    return max(versions, key=lambda p: int(p.name)) / "model.onnx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--port", type=int, default=8004)
    parser.add_argument("--grpc-port", type=int, help="MLServer's gRPC port (default: a free one)")
    parser.add_argument(
        "--workers", type=int, help="inference worker processes (default: MLServer's, 1)"
    )
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="mlserver-"))
    settings = {
        "host": "127.0.0.1",
        "http_port": args.port,
        "grpc_port": args.grpc_port or free_port(),
        "metrics_port": free_port(),
    }
    if args.workers is not None:
        settings["parallel_workers"] = args.workers
    (folder / "settings.json").write_text(json.dumps(settings))
    for model_dir in sorted(args.repository.resolve().iterdir()):
        if not model_dir.is_dir() or model_dir.name.startswith("."):
            continue
        model = {
            "name": model_dir.name,
            "implementation": "mlserver_onnx.OnnxRuntime",
            "parameters": {"uri": str(latest_model(model_dir))},
        }
        (folder / model_dir.name).mkdir()
        (folder / model_dir.name / "model-settings.json").write_text(json.dumps(model))
    # The inference worker processes import the runtime by name: from this directory.
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    mlserver = Path(sys.executable).parent / "mlserver"
    os.execve(mlserver, [str(mlserver), "start", str(folder)], env)


if __name__ == "__main__":
    main()
