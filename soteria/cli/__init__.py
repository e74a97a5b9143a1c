"""The ``soteria`` command line: one module per command (heads, steer, push, eval, demo, convert, env).

Each command module has ``add_parser(subparsers)`` and ``run(args) -> exit status``;
:mod:`.main` builds the parser and turns a user's mistake into a one-line message and exit 2.
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
