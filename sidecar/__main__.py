"""``python -m sidecar``: the ``sidecar`` command (serve, emulate, demo)."""

from sidecar.cli import main

raise SystemExit(main())
