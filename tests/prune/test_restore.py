"""restored_on_error: nested guards take one snapshot and restore."""

from __future__ import annotations

import pytest
import torch


def test_nested_restore_takes_one_snapshot_and_restores() -> None:
    """oneshot guards the weights once; the layer-wise pruner inside it takes no second copy,
    and an error still leaves the weights as they were before the outer call."""
    from mfac.prune.restore import restored_on_error

    w = torch.ones(3)
    with pytest.raises(RuntimeError, match="inner"):
        with restored_on_error([w]):
            w.fill_(2.0)
            try:
                with restored_on_error([w]):
                    w.fill_(3.0)
                    raise RuntimeError("inner")
            except RuntimeError:
                assert torch.equal(w, torch.full((3,), 3.0))  # inner wrote nothing back
                raise
    assert torch.equal(w, torch.ones(3))
    with restored_on_error([w]):  # no error: nothing is written back
        w.fill_(5.0)
    assert torch.equal(w, torch.full((3,), 5.0))
