"""``python -m mfac``: the same as the ``mfac`` command (and ``python -m mfac.cli``)."""

from .cli import main

raise SystemExit(main())
