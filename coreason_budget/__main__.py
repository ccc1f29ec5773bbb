"""``python -m coreason_budget``: the ``coreason-budget`` command without a console script."""

from .cli import main

raise SystemExit(main())
