"""The pruning methods, one module each (its option set, its solver and its registry entry
``METHOD``): :mod:`.magnitude`, :mod:`.diag_fisher`, :mod:`.mfac_obs` (``mfac``),
:mod:`.mfac_exact`, :mod:`.sparsegpt`, :mod:`.wanda`, :mod:`.presets` (``owl-sparsegpt``,
``fisher-sparsegpt``) and :mod:`.iobs`. They are registered in :mod:`mfac.prune.registry`."""
