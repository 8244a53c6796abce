"""Experiments built on the library (the tour behind ``mfac demo``); their models and data
loaders are shared with ``benchmarks/``."""
