from xlstm_tune.cli.main import main

raise SystemExit(main())
