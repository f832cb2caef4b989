from agent_runtime.cli import main

raise SystemExit(main())
