from sniproxy.cli import main

raise SystemExit(main())
