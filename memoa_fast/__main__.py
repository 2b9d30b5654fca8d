"""``python -m memoa_fast`` is the ``memoa`` command."""
from .timeseries.cli import main

raise SystemExit(main())
