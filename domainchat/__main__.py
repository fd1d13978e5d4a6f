"""`python -m domainchat …` is the same as the `domainchat` console script."""

from domainchat.cli import main

raise SystemExit(main())
