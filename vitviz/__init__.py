"""vitviz: see what a Vision Transformer has learned."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vitviz.errors import VitvizError

if TYPE_CHECKING:
    from vitviz.tokens import TokenLayout, token_layout

__all__ = ["TokenLayout", "VitvizError", "token_layout"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """`TokenLayout` and `token_layout` are imported on first use, so `import vitviz` (and `python -m vitviz
    --help`) does not import torch."""
    if name in ("TokenLayout", "token_layout"):
        from vitviz import tokens

        return getattr(tokens, name)
    raise AttributeError(f"module 'vitviz' has no attribute {name!r}")
