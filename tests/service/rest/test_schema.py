"""Schemathesis against the served OpenAPI schema: no 5xx, and every status is documented.

Every operation in ``/openapi.json``, with positive and negative cases (bodies,
queries and path parameters that fit the schema, and ones that do not), is sent to a
real server on 127.0.0.1 over real trained models, with the API key on every request.
Path parameters are mostly steered to models and versions that exist, so cases reach
the decoders, the inference and the management code instead of stopping at 404;
an unload that succeeds is followed by a load, so later cases still find the model
served (a 400 for an unloaded model is the documented answer, not a bug).

The schema is read from the app when the tests are collected (schemathesis makes one
test per operation then) and the requests go to the fixture's server; a test checks
that the server answers this very schema. (``schemathesis.pytest.from_fixture``, the
loader for a schema that only a fixture's server can answer, fails on pytest 9.2: it
sets ``Function._nodeid``, which pytest no longer has.)

The default run, for ``make test``, is about 100 cases. A longer one, with the
coverage phase (boundary values, missing and wrong-typed parameters, other methods)
and more fuzzed cases per operation; the count and the statuses seen are logged::

    FOLDSERVE_SCHEMA_EXAMPLES=40 FOLDSERVE_SCHEMA_COVERAGE=1 python -m pytest \
        tests/service/rest/test_schema.py -o log_cli=true --log-cli-level=INFO
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import strategies as st
from pydantic import SecretStr
from schemathesis.checks import not_a_server_error, status_code_conformance

from service.app import create_app
from service.settings import Settings
from tests.servers import API_KEY, LiveServer, live_server, server_settings

log = logging.getLogger(__name__)

EXAMPLES = int(os.environ.get("FOLDSERVE_SCHEMA_EXAMPLES", "6"))
COVERAGE = os.environ.get("FOLDSERVE_SCHEMA_COVERAGE", "") == "1"
SEED = 0
# Small models only: fold-latency's warm-up is not time-limited, and a fuzzed
# batch_size=256, warmup=1000 on the CNN would take seconds per case.
MODELS = ["breast_cancer_mlp", "linear", "two_io"]
KEY = {"Authorization": f"Bearer {API_KEY}"}


def steer(params: dict[str, Any] | None) -> st.SearchStrategy[dict[str, Any] | None]:
    """Three in four names are served models (the rest stay as generated); versions alike."""
    if not params:  # an operation without path parameters
        return st.just(params)
    choices: dict[str, st.SearchStrategy[Any]] = {}
    if isinstance(params.get("name"), str):
        choices["name"] = st.sampled_from([*MODELS, params["name"]])
    if isinstance(params.get("version"), str):
        choices["version"] = st.sampled_from(["1", "1", "2", params["version"]])
    return st.fixed_dictionaries(choices).map(lambda chosen: {**params, **chosen})


class Tally:
    """Responses seen by status, for the log line at the end of the run."""

    def __init__(self) -> None:
        self.statuses: Counter[int] = Counter()


def served_schema() -> dict[str, Any]:
    """The OpenAPI schema the app answers at ``/openapi.json`` (the test below checks that
    the live server serves this very schema). Loaded at import: schemathesis makes one
    test per operation when the tests are collected."""
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            repository=Path(tmp) / "models",
            runtime_dir=Path(tmp) / "runtime",
            api_key=SecretStr(API_KEY),
        )
        return create_app(settings).openapi()


# What a schemathesis.toml would say; the coverage phase (~500 cases here) only when asked.
CONFIG = schemathesis.Config.from_dict(
    {
        "seed": SEED,
        "headers": KEY,
        "request-timeout": 60,
        "generation": {"max-examples": EXAMPLES, "database": "none"},
        "phases": {"coverage": {"enabled": COVERAGE}},
    }
)
schema = schemathesis.openapi.from_dict(served_schema(), config=CONFIG)


@schema.hook
def flatmap_path_parameters(
    _: Any, params: dict[str, Any] | None
) -> st.SearchStrategy[dict[str, Any] | None]:
    return steer(params)


@pytest.fixture(scope="module")
def tally() -> Iterator[Tally]:
    counts = Tally()
    yield counts
    log.info(
        "schemathesis: %d cases, statuses %s",
        counts.statuses.total(),
        dict(sorted(counts.statuses.items())),
    )


@pytest.fixture(scope="module")
def fuzzed(model_store: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server for every operation's cases (a fold-latency run stops after 0.5 s)."""
    repo = model_store.copy_to(tmp_path_factory.mktemp("schema") / "models")
    with live_server(server_settings(repo, fold_latency_max_seconds=0.5)) as live:
        yield live


def test_the_fuzzed_schema_is_the_served_one(fuzzed: LiveServer) -> None:
    with fuzzed.client() as client:
        assert client.get("/openapi.json").json() == schema.raw_schema


@schema.parametrize()
def test_no_generated_request_gets_a_server_error(
    case: Any, fuzzed: LiveServer, tally: Tally
) -> None:
    response = case.call_and_validate(
        base_url=fuzzed.url, checks=[not_a_server_error, status_code_conformance]
    )
    tally.statuses[response.status_code] += 1
    if case.path.endswith("/unload") and response.status_code == 200:
        name = case.path_parameters["name"]
        with fuzzed.client() as client:
            r = client.post(f"/v2/repository/models/{name}/load", headers=KEY)
        assert r.status_code == 200, r.text
