"""The app around the models: health, readiness, docs offline, settings, logging, no torch."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.__main__ import parse_args
from service.app import create_app
from service.observability.logs import JsonFormatter, RequestIdFilter, request_id_var
from service.settings import Settings


def test_health_and_server_metadata(client: httpx.Client) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    ready = client.get("/v2/health/ready")
    assert (ready.status_code, ready.json()) == (200, {"ready": True})
    meta = client.get("/v2").json()
    assert meta["name"] == "foldserve" and meta["version"]
    assert {"binary_tensor_data", "model_repository", "classification"} <= set(meta["extensions"])


def test_not_ready_until_the_repository_has_loaded(tmp_path: Path) -> None:
    """Without the lifespan (so without the background load) nothing is ready yet."""
    import anyio

    settings = Settings(_env_file=None, repository=tmp_path, providers="cpu")  # type: ignore[call-arg]
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)  # runs no lifespan

    async def check() -> None:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/v2/health/live")).json() == {"live": True}
            ready = await client.get("/v2/health/ready")
            assert (ready.status_code, ready.json()) == (503, {"ready": False})
            infer = await client.post("/v2/models/m/infer", json={"inputs": []})
            assert infer.status_code == 503 and "still loading" in infer.json()["error"]
            app.state.repository.load_all()  # an empty repository is a ready one
            assert (await client.get("/v2/health/ready")).status_code == 200

    anyio.run(check)


def test_docs_work_offline(client: httpx.Client) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    assert "/static/swagger-ui/swagger-ui-bundle.js" in page.text
    assert "/static/swagger-ui/swagger-ui.css" in page.text
    assert "cdn.jsdelivr.net" not in page.text
    script = client.get("/static/swagger-ui/swagger-ui-bundle.js")
    assert script.status_code == 200 and len(script.content) > 100_000
    assert client.get("/static/swagger-ui/swagger-ui.css").status_code == 200
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]
    assert {"application/json", "application/octet-stream"} <= set(body)
    assert "inputs" in body["application/json"]["schema"]["properties"]
    assert "/v1/models/{name}:predict" in schema["paths"]


def test_index_links(client: httpx.Client) -> None:
    links = client.get("/").json()["links"]
    for path in links.values():
        assert client.get(path).status_code == 200, path


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("FOLDSERVE_HOST=10.0.0.1\nFOLDSERVE_THREADS=3\n")
    monkeypatch.setenv("FOLDSERVE_PORT", "9001")
    monkeypatch.setenv("FOLDSERVE_REPOSITORY", "/env/models")
    monkeypatch.setenv("FOLDSERVE_API_KEY", "sekret-123")
    from_env = Settings()
    assert (from_env.host, from_env.port, from_env.threads) == ("10.0.0.1", 9001, 3)
    assert from_env.repository == Path("/env/models")
    assert from_env.api_key is not None and from_env.api_key.get_secret_value() == "sekret-123"
    assert "sekret" not in repr(from_env)  # the key is not logged by accident
    flags = parse_args(["--repository", "/flag/models", "--port", "8123", "--providers", "cpu"])
    merged = Settings(**flags)
    assert (merged.repository, merged.port, merged.providers) == (Path("/flag/models"), 8123, "cpu")
    assert merged.host == "10.0.0.1"  # not given as a flag: the environment's value stays


@pytest.mark.parametrize(
    ("env", "value"), [("FOLDSERVE_PORT", "not-a-port"), ("FOLDSERVE_PROVIDERS", "tpu")]
)
def test_invalid_settings_are_rejected(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str
) -> None:
    from pydantic import ValidationError

    monkeypatch.setenv(env, value)
    with pytest.raises(ValidationError):
        Settings(_env_file=None)  # type: ignore[call-arg]


def test_empty_api_key_means_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOLDSERVE_API_KEY", "")
    assert Settings(_env_file=None).api_key is None  # type: ignore[call-arg]


def test_invalid_settings_stop_the_command_cleanly(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.__main__ import main

    monkeypatch.setenv("FOLDSERVE_PORT", "99999")
    with pytest.raises(SystemExit, match="invalid settings"):
        main([])


def test_json_log_lines_carry_the_request_id() -> None:
    record = logging.LogRecord("service.x", logging.INFO, __file__, 1, "hello %s", ("there",), None)
    token = request_id_var.set("rid-1")
    try:
        RequestIdFilter().filter(record)
    finally:
        request_id_var.reset(token)
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "hello there" and line["request_id"] == "rid-1"
    assert line["level"] == "INFO" and line["logger"] == "service.x"


NO_TORCH = """
import importlib, pkgutil, sys
import service
from service.app import create_app
from service.settings import Settings
for info in pkgutil.walk_packages(service.__path__, "service."):
    importlib.import_module(info.name)
create_app(Settings(_env_file=None))
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "training"))
print(bad)
sys.exit(1 if bad else 0)
"""


def test_service_never_imports_torch() -> None:
    """Every module of service/, and an app built from it, leave torch unimported."""
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_real_process_starts_from_the_command_line(
    tmp_path: Path, build: Any, serve_process: Any
) -> None:
    """``python -m service`` with settings from flags and the environment (JSON logs), one
    worker, stopped after one request: its log says the model loaded and the request came."""
    build.write_version(tmp_path, "linear", 1, build.linear_model(4, 5))
    # No drain window: this test stops the server, it does not test draining (test_service_drain).
    env = {"FOLDSERVE_LOG_FORMAT": "json", "FOLDSERVE_DRAIN_SECONDS": "0"}
    env["FOLDSERVE_ACCESS_LOG"] = "true"
    flags = ["--host", "127.0.0.1", "--log-level", "info"]
    with serve_process(tmp_path, 1, *flags, **env) as server:
        found = server.client.get("/v2/models/linear")
        assert found.status_code == 200, found.text
        assert found.json()["provider"] == "CPUExecutionProvider"
        log = tmp_path.parent / f"server-{server.url.rsplit(':', 1)[1]}.log"
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert any("model linear version 1 ready" in line["message"] for line in lines)
    assert any(line["logger"] == "service.access" and line["request_id"] != "-" for line in lines)


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("OPTIONS", "/v1/models/digits_cnn:predict", "POST"),  # not /v1/models/{name}'s GET
        ("GET", "/v2/models/digits_cnn/infer", "POST"),
        ("PUT", "/v2/models/digits_cnn/versions/1/infer", "POST"),
        ("OPTIONS", "/v2/repository/index", "GET, POST"),  # Starlette said GET alone
        ("DELETE", "/v2/health/live", "GET"),
    ],
)
def test_other_methods_get_405_with_every_method_the_path_takes(
    client: httpx.Client, method: str, path: str, allow: str
) -> None:
    r = client.request(method, path)
    assert r.status_code == 405 and r.headers["allow"] == allow
    assert r.json() == {"error": f"method {method} is not allowed on {path}; it takes {allow}"}
    openapi = client.get("/openapi.json").json()["paths"]
    template = path.replace("digits_cnn", "{name}").replace("/1/", "/{version}/")
    declared = [m.upper() for m in ("get", "post") if m in openapi[template]]
    assert ", ".join(declared) == allow  # what the schema declares, no more, no less


def test_each_inference_route_is_documented_once(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}/infer",
        "/v1/models/{name}:predict",
    ):
        assert list(paths[path]) == ["post"]
        operation = paths[path]["post"]
        assert "application/json" in operation["requestBody"]["content"]
        assert {"200", "400", "404", "503"} <= set(operation["responses"])


PROBE = """
import onnx, numpy as np
from onnx import helper, TensorProto, numpy_helper
from service.models.sessions import SessionFactory
g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
factory = SessionFactory("auto", 1, "off")
for _ in range(2):
    print(factory.create(m.SerializeToString()).get_providers()[0])
"""


def test_cpu_only_start_up_prints_no_onnxruntime_error() -> None:
    """providers=auto on a machine without a usable GPU: CPU, and no red ERROR from ORT."""
    import onnxruntime as ort

    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    providers = done.stdout.split()
    if "CUDAExecutionProvider" in providers:
        pytest.skip("this machine runs CUDA: nothing falls back")
    assert providers == ["CPUExecutionProvider"] * 2
    assert "[E:onnxruntime" not in done.stderr, done.stderr[-2000:]
    assert "CUDAExecutionProvider" in ort.get_available_providers()  # the probe really ran
