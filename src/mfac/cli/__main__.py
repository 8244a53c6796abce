"""``python -m mfac.cli``: the same as the ``mfac`` command."""

from . import main

raise SystemExit(main())
