"""Fixtures for every test: a real ``python -m service`` process with several workers
(:func:`tests.servers.server_process`), a free port, a directory built once per run."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.processes import free_port
from foldserve.files import file_lock
from tests import ROOT
from tests.servers import server_process

# One thread of math per process: pytest-xdist runs a test process per CPU already, and
# the servers and torchrun processes the tests start are more; torch's (OpenMP), OpenBLAS's
# and MKL's thread pools on top of them oversubscribe the CPUs and spin-wait. Set before any
# of them loads here, and inherited by every process the tests start (docs/benchmarks.md,
# "Test suite time"). A value in the environment wins.
for _threads in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_threads, "1")
# Servers the tests start serve no gRPC unless a test asks (a port of its own): the default,
# 8001, may be taken on a shared machine, and two servers must never share it.
os.environ["FOLDSERVE_GRPC_PORT"] = "0"
# Nor do they drain for the default 5 s after SIGTERM (each stop would wait it out): the
# drain tests ask for their own --drain-seconds.
os.environ["FOLDSERVE_DRAIN_SECONDS"] = "0"


# The files that run longest here, longest first (docs/benchmarks.md, "Test suite time").
# pytest-xdist hands each worker whole files (`--dist loadfile`) in collection order
# (`--no-loadscope-reorder`, in pyproject.toml; by default it sends the files with the most
# tests first, which left these one- and few-test files for last, and one worker running the
# longest of them alone at the end).
LONGEST_FIRST = (
    "tests/service/process/test_workers.py",
    "tests/bench/test_reliability.py",
    "tests/training/test_distributed.py",
    "tests/training/test_experiments.py",
    "tests/service/dataplane/test_overload.py",
    "tests/service/process/test_readiness.py",
    "tests/bench/test_rollouts.py",
    "tests/training/test_export.py",
    "tests/service/rest/test_connections.py",
    "tests/training/test_retrain.py",
    "tests/service/test_errors.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files in LONGEST_FIRST first, in that order; the rest keep theirs."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.relative_to(ROOT).as_posix(), len(rank)))


@pytest.fixture(autouse=True)
def root_logging_restored() -> Iterator[None]:
    """The root logger as it was before the test: a CLI run through typer's CliRunner sets
    a handler on the stream the runner then closes, and every later log line in this
    process would print a "Logging error" traceback instead."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One torch intra-op thread: tiny models train faster, bit for bit repeatably, and are
    robust to a busy machine (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``;
    torch is imported here, so the service tests never need it)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def routes(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every path the service's app serves (its OpenAPI schema), for the deploy checks."""
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(_env_file=None, repository=tmp_path_factory.mktemp("repo")))  # type: ignore[call-arg]
    return set(app.openapi()["paths"])


@pytest.fixture(scope="session")
def build_once(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[str, Callable[[Path], None]], Path]:
    """``build_once(name, build)``: the directory ``build(directory)`` filled, built once per
    test run. pytest-xdist runs a session per worker process: the first worker to ask builds
    it, the others wait on a file lock and reuse it (so a trained store is trained once)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base

    def once(name: str, build: Callable[[Path], None]) -> Path:
        target, done = shared / name, shared / f"{name}.done"
        with file_lock(shared / f"{name}.lock"):
            if not done.exists():
                shutil.rmtree(target, ignore_errors=True)  # a build that failed half-way
                target.mkdir()
                build(target)
                done.touch()
        return target

    return once


@pytest.fixture
def unused_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    return free_port()


@pytest.fixture(scope="session")
def serve_process() -> Callable[..., object]:
    """``with serve_process(repository, workers, *flags, **env) as server``."""
    return server_process
