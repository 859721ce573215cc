"""`python -m bridge` is the same CLI as `postback-bridge`."""

from bridge.cli import main

raise SystemExit(main())
