"""``mfac.prune.oneshot``: one entry point for every registered pruning method."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Sequence

from torch import nn

from ._layers import current_masks, find_targets
from .collect import LossFn
from .method import Request
from .patterns import check_nm_sparsity, check_pattern_fits, parse_pattern
from .registry import REGISTRY, get_method
from .restore import restored_on_error
from .result import PruneResult, summarize

#: Names of the registered methods (see :mod:`mfac.prune.registry`).
METHODS = tuple(REGISTRY)

__all__ = ["METHODS", "oneshot"]


def oneshot(
    model: nn.Module,
    sparsity: float | None,
    method: str = "mfac",
    *,
    data: Iterable[object] | None = None,
    loss_fn: LossFn | None = None,
    pattern: str | Sequence[int] | None = None,
    **options: object,
) -> PruneResult:
    """Prune the Linear/Conv weights of ``model`` in place to ``sparsity`` with ``method``.

    Which layers: ``layers`` / ``exclude`` options (names or glob patterns, checked against the
    model); by default every Linear/Conv, but for a Hugging Face model only the layers of its
    stack of blocks (name ``lm_head`` to prune the head, and a tied embedding with it: a
    warning and ``result.info["tied"]`` say so).

    ``data`` is an iterable of batches and ``loss_fn(model, batch)`` returns a scalar loss
    (the layer-wise methods only run it forward, for calibration). ``pattern`` is None
    (unstructured) or "N:M"; with a pattern, ``sparsity`` is None or 1 - N/M (a contradicting
    value is refused). ``options`` are the fields of the method's option set
    (``REGISTRY[method].config``, e.g. :class:`mfac.prune.methods.mfac_obs.MFACOBSConfig`; the
    tables in docs/cli.md list them with their defaults); unknown names raise TypeError.

    Everything is validated first; on any error (including a NaN loss) the weights are restored
    and the model is left as it was.
    """
    spec = get_method(method)
    cfg = spec.config.build(options, f"method {method!r}")
    nm = parse_pattern(pattern)
    if nm is not None and not spec.patterns:
        raise ValueError(f"method {method!r} does not take an N:M pattern")
    targets = find_targets(model, cfg.layers, getattr(cfg, "exclude", ()))
    check_pattern_fits(targets, nm)
    sparsity = check_nm_sparsity(sparsity, nm)
    if spec.needs_data and (data is None or loss_fn is None):
        raise ValueError(f"method {method!r} needs data= (batches) and loss_fn=(model, batch)")
    req = Request(model, targets, current_masks(targets), sparsity, nm, data, loss_fn)
    tied = {t.name: list(t.tied) for t in targets if t.tied}
    if tied:
        req.info["tied"] = tied
        for name, others in tied.items():
            warnings.warn(
                f"{name}.weight is tied to {', '.join(others)}: pruning {name} prunes "
                f"{'them' if len(others) > 1 else 'it'} too",
                UserWarning,
                stacklevel=2,
            )
    if spec.check is not None:
        spec.check(req, cfg)

    guarded = (
        list(model.state_dict().values()) if spec.restores == "model"
        else [t.param for t in targets]
    )  # fmt: skip
    start = time.perf_counter()
    with restored_on_error(guarded):
        masks = spec.run(req, cfg)
    req.timings["total"] = time.perf_counter() - start
    per, overall = summarize(masks)
    return PruneResult(method, sparsity, nm, masks, per, overall, req.timings, info=req.info)
