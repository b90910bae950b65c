"""Real networks nobody here wrote, exported the way older PyTorch exporters did (TorchScript,
no constant folding, BN kept), fold to zero BN within 1e-4 of the unfolded ONNX and of
eager PyTorch. Needs the pure-PyTorch model packages (efficientnet_pytorch, geffnet, which
`make setup` installs outside pyproject: --no-deps); skipped, saying so, without them.
64x64 inputs keep the two models under ~15 s."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from foldserve.onnx_fold import fold_model
from training.batchnorm import randomize_batchnorm

WHY = "installed by `make setup` (--no-deps, not in pyproject): pip install --no-deps {}"
pytest.importorskip("efficientnet_pytorch", reason=WHY.format("efficientnet_pytorch==0.7.1"))
pytest.importorskip("geffnet", reason=WHY.format("geffnet==1.0.2"))


def _network(name: str) -> torch.nn.Module:
    if name == "efficientnet-b0":
        from efficientnet_pytorch import EfficientNet

        network: torch.nn.Module = EfficientNet.from_name(name)  # from_pretrained downloads
        return network
    import geffnet

    network = geffnet.create_model(name, pretrained=False)
    return network


def _export(module: torch.nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (x,),
            buffer,  # type: ignore[arg-type]  # a file object works: torch's stub says a path
            dynamo=False,
            do_constant_folding=False,
            opset_version=13,
            training=torch.onnx.TrainingMode.PRESERVE,  # eval mode, BN nodes kept
            input_names=["input"],
            dynamic_axes={"input": {0: "batch"}},
        )
    return onnx.load_from_string(buffer.getvalue())


# name -> what it exercises: a squeeze-excite CNN with "same" padding done by Pad nodes on
# run-time shapes (49 BN); mixed-kernel Concats of convs (BN folded slice by slice)
@pytest.mark.parametrize("name", ["efficientnet-b0", "mixnet_s"])
def test_public_network_folds_to_zero_batchnorm(name: str) -> None:
    module = _network(name).eval()
    randomize_batchnorm(module, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    model = _export(module, x)
    outcome = fold_model(model)
    report = outcome.report
    assert report.batchnorm_before == 49 and report.batchnorm_after == 0
    assert report.kept == [] and len(report.folded) == 49
    assert report.max_abs_diff <= 1e-4
    with torch.no_grad():
        expected = module(x).numpy()
    session = ort.InferenceSession(
        outcome.model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    (got,) = session.run(None, {"input": x.numpy()})
    assert float(np.max(np.abs(got - expected))) <= 1e-4 * max(1.0, float(np.abs(expected).max()))
