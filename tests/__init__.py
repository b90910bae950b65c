"""FoldServe's tests, a package mirroring the source tree (tests/service/rest/ tests
service/rest/, ...): test modules are named by their path, so two folders may each hold a
test_codec.py, and helpers are imported by it (``from tests.polling import poll``)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout under test
