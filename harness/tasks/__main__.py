from harness.tasks.files import main

raise SystemExit(main())
