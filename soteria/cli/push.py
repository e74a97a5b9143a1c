"""``soteria push``: upload a folder written by ``soteria steer`` to the Hub."""

from __future__ import annotations

from ..export import push_to_hub


def run(args) -> int:
    info = push_to_hub(
        args.folder, args.repo_id, private=not args.public, token=args.token, commit_message=args.message
    )
    print(f"pushed {args.folder} to {getattr(info, 'commit_url', None) or args.repo_id}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("push", help="push a saved steered model to the Hub", description="Upload a folder written "
                       "by `soteria steer` to a Hub model repo (created if needed, private by default).")  # fmt: skip
    p.add_argument("folder", help="folder written by `soteria steer`")
    p.add_argument("repo_id", help="Hub repo id, e.g. you/model-soteria")
    p.add_argument("--public", action="store_true", help="create the repo public (default: private)")
    p.add_argument("--token", default=None)
    p.add_argument("--message", default=None, help="commit message")
    p.set_defaults(func=run)
