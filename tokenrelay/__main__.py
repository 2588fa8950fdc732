from tokenrelay.cli import main

raise SystemExit(main())
