"""Experiments built on the library, below the command line: the tour behind ``mfac demo``
(its models and data loaders shared with ``benchmarks/``), supervised tasks, the resumable
training loop and its checkpoints, and the tables, report pages and plots that show results."""
