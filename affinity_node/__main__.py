from affinity_node.cli import main

raise SystemExit(main())
