"""The base of every result the library returns: which method ran and what else it found."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Result:
    """``method``: the method that produced the result; ``info``: method-specific facts
    (damping actually used, iteration traces, ...), JSON-friendly where possible."""

    method: str
    info: dict[str, Any] = field(default_factory=dict, kw_only=True)
