from livetower.cli import main

raise SystemExit(main())
