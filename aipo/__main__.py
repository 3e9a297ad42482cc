"""``python -m aipo``: the same command line as ``aipo``."""

from aipo.cli import main

raise SystemExit(main())
