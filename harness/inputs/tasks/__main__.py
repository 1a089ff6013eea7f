from harness.inputs.tasks.files import main

raise SystemExit(main())
