"""The ``soteria`` command line: heads, steer, push, eval, demo, convert, env.

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
from . import convert, demo, env, evaluate, heads, push, steer, tune

__all__ = ["build_parser", "main"]

#: A user's mistake or a Hub refusal (bad token, missing repo): one line, exit 2.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError, SoteriaHubError, FetchError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="soteria",
        description="Language-specific functional parameter steering for multilingual safety (arXiv 2502.11244).",
    )
    parser.add_argument("--version", action="version", version=f"soteria {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in (heads, steer, push, tune, demo, convert, env, evaluate):
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
        msg = str(e)
        print(f"soteria {args.command}: error: {msg.splitlines()[0] if msg else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
