"""``python -m soteria``: the command line (:mod:`soteria.cli`)."""

from soteria.cli import main

raise SystemExit(main())
