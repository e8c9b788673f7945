"""vitviz: see what a Vision Transformer has learned."""

from vitviz.errors import VitvizError
from vitviz.tokens import TokenLayout, token_layout

__all__ = ["TokenLayout", "VitvizError", "token_layout"]
__version__ = "0.1.0"
