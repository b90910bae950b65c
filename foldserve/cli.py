"""``foldserve COMMAND ...``: ``serve`` is ``python -m service``, every other command is
``python -m training``'s; the rest of the arguments pass through unchanged.

``foldserve serve`` never imports torch or training (the serving image has neither);
a training command on a serving install says what to install instead of a traceback.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

USAGE = """\
usage: foldserve COMMAND [ARGS]...

  serve     run the inference server: the same flags as `python -m service`
            (foldserve serve --help)
  COMMAND   a training command, the same as `python -m training COMMAND`: train,
            export, fold, retrain, fold-onnx... (foldserve --help-training lists them;
            needs the training install: pip install 'foldserve[train]')
"""
TRAINING_MISSING = (
    "foldserve {command}: this is a serving install, without {missing}; training commands "
    "need the training install: pip install 'foldserve[train]' (foldserve serve works here)"
)


def main(argv: Sequence[str] | None = None) -> None:
    """Run one command; exits with its status (2 for a usage error)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        sys.exit(0 if args else 2)
    if args[0] == "serve":
        from service.__main__ import main as serve

        serve(args[1:], prog="foldserve serve")
        return
    command = args[0]
    if command == "--help-training":
        args = ["--help"]
    missing = [name for name in ("torch", "training") if not _installed(name)]
    if missing:
        sys.exit(TRAINING_MISSING.format(command=command, missing=" and ".join(missing)))
    from training.__main__ import app

    app(args=args, prog_name="foldserve")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent that fails to import, or a None stub
        return False


if __name__ == "__main__":
    main()
