from gptkernels.bench import main

raise SystemExit(main())
