from gptkernels.cli import main

raise SystemExit(main())
