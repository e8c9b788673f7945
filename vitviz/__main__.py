"""python -m vitviz: see vitviz/cli.py."""

from vitviz.cli import main

raise SystemExit(main())
