"""The ``soteria`` command line: heads, steer, apply, push, tune, eval, demo, convert, env.

A user's mistake (bad argument, missing file, unknown language) exits with code 2 and a
one-line message; ``SOTERIA_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..export import SoteriaHubError
from ..models.pretrained import FetchError
from ..version import __version__

__all__ = ["COMMANDS", "build_parser", "main"]

#: Each command's module, imported by name only when the parser needs it: ``soteria steer ...``
#: imports the steer command alone, not the demo's, tune's or evaluation's dependencies.
COMMANDS = {
    **{name: f"soteria.cli.{name}" for name in ("heads", "steer", "apply", "push", "tune", "demo", "convert", "env")},
    "eval": "soteria.cli.evaluate",
}

#: A user's mistake, a Hub refusal (bad token, missing repo) or a missing extra: one line, exit 2.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError, PermissionError, ImportError,
               SoteriaHubError, FetchError)  # fmt: skip


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of ``command`` alone (a name in :data:`COMMANDS`)."""
    parser = argparse.ArgumentParser(
        prog="soteria",
        description="Language-specific functional parameter steering for multilingual safety (arXiv 2502.11244).",
    )
    parser.add_argument("--version", action="version", version=f"soteria {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        if command is None or name == command:
            importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The command is the first argument (the top level has only --help and --version); anything
    # else gets the full parser, whose usage and errors list every command.
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(command).parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        if os.environ.get("SOTERIA_DEBUG"):
            raise
        # One line, all of it: a list of problems ("...:\n  - a\n  - b") becomes "...: a; b".
        lines = [line.strip().removeprefix("- ") for line in str(e).splitlines() if line.strip()]
        msg = (lines[0] + " " + "; ".join(lines[1:])) if len(lines) > 1 else (lines[0] if lines else type(e).__name__)
        print(f"soteria {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
