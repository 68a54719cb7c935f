"""``python -m corral``: the same as the ``corral`` command."""

from .cli import main

raise SystemExit(main())
