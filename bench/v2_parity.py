"""One V2 inference through a running FoldServe, against ONNX Runtime run here on the same file.

    python bench/v2_parity.py URL REPOSITORY MODEL

``deploy/image_check.sh`` runs it against the serving image: the server answers
from inside the image, this script reads the served version's ``model.onnx``
from the mounted repository and runs it in this process's ONNX Runtime. The
inputs are the version's reference batch (``metadata.json``). Prints the
request, both outputs' max abs difference and the argmax agreement, and exits 1
when they differ by more than the reference batch's tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from foldserve.datatypes import NUMPY_DTYPES, V2_DATATYPES
from foldserve.model_format import FOLDED_FILE, VersionMetadata, version_numbers


def infer_v2(url: str, model: str, version: int, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """POST a V2 JSON inference request; the decoded response body."""
    body = {
        "inputs": [
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": V2_DATATYPES[array.dtype],
                "data": array.reshape(-1).tolist(),
            }
            for name, array in inputs.items()
        ]
    }
    request = urllib.request.Request(
        f"{url}/v2/models/{model}/versions/{version}/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("repository", type=Path, help="the model repository the server serves")
    parser.add_argument("model", help="model name")
    args = parser.parse_args()

    version = max(version_numbers(args.repository / args.model))
    version_dir = args.repository / args.model / str(version)
    meta = VersionMetadata.read(version_dir)
    inputs = {name: tensor.array() for name, tensor in meta.reference.inputs.items()}

    start = time.perf_counter()
    answer = infer_v2(args.url, args.model, version, inputs)
    http_ms = (time.perf_counter() - start) * 1e3
    session = ort.InferenceSession(
        str(version_dir / FOLDED_FILE), providers=["CPUExecutionProvider"]
    )
    local = dict(
        zip([o.name for o in session.get_outputs()], session.run(None, inputs), strict=True)
    )

    worst = 0.0
    for out in answer["outputs"]:
        served = np.asarray(out["data"], dtype=NUMPY_DTYPES[out["datatype"]]).reshape(out["shape"])
        direct = local[out["name"]]
        diff = float(np.abs(served - direct).max())
        worst = max(worst, diff)
        agree = float((served.argmax(-1) == direct.argmax(-1)).mean())
        print(
            f"{args.model} v{version} output {out['name']} {out['shape']}: "
            f"max abs diff served vs ONNX Runtime here {diff:.3g}, argmax agreement {agree:.0%}, "
            f"HTTP round trip {http_ms:.1f} ms (model_name={answer['model_name']}, "
            f"model_version={answer['model_version']})"
        )
    if worst > meta.reference.atol:
        print(f"FAIL: difference {worst:.3g} above the reference tolerance {meta.reference.atol}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
