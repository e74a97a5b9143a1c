from soteria.cli import main

raise SystemExit(main())
