"""``python -m prefork_sessions``: the ``prefork-sessions`` command line (``_cli``)."""

from ._cli import main

raise SystemExit(main())
