from synpo.cli import main

raise SystemExit(main())
