"""The ``soteria`` command line: heads, steer, apply, push, tune, eval, demo, convert, env.

A user's mistake (bad argument, missing file, unknown language) exits with code 2 and a
one-line message; ``SOTERIA_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..export import SoteriaHubError
from ..models.pretrained import FetchError
from ..version import __version__
from . import apply, convert, demo, env, evaluate, heads, push, steer, tune

__all__ = ["build_parser", "main"]

#: A user's mistake, a Hub refusal (bad token, missing repo) or a missing extra: one line, exit 2.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError, PermissionError, ImportError,
               SoteriaHubError, FetchError)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="soteria",
        description="Language-specific functional parameter steering for multilingual safety (arXiv 2502.11244).",
    )
    parser.add_argument("--version", action="version", version=f"soteria {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in (heads, steer, apply, push, tune, demo, convert, env, evaluate):
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
