"""``python -m memoa_fast`` is the ``memoa`` command."""
from .cli import main

raise SystemExit(main())
