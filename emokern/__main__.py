from emokern.cli import main

raise SystemExit(main())
