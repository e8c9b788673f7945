"""Model EMA as a component of the resume state: timm's `ModelEmaV3`, off when the config's ema_decay is none."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from timm.utils import ModelEmaV3
from torch import nn

from vitviz.errors import VitvizError


class ModelEma:
    """An exponential moving average of a module's weights (`timm.utils.ModelEmaV3`), updated after every
    optimiser step with the step number (so its decay warm-up, if any, is a function of the step)."""

    def __init__(self, module: nn.Module, decay: float | None) -> None:
        self._ema = None if decay is None else ModelEmaV3(module, decay=decay)

    @property
    def module(self) -> nn.Module | None:
        """The averaged copy of the module, or None when EMA is off."""
        return None if self._ema is None else self._ema.module

    def update(self, module: nn.Module, step: int) -> None:
        if self._ema is not None:
            self._ema.update(module, step=step)

    def state_dict(self) -> dict[str, Any]:
        return {"weights": {} if self._ema is None else self._ema.module.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        weights = state["weights"]
        if self._ema is None:
            if weights:
                raise VitvizError("the resume state holds a model EMA but the run's config has ema_decay none")
            return
        if not weights:
            raise VitvizError("the run's config has a model EMA but its resume state holds none")
        self._ema.module.load_state_dict(dict(weights), strict=True)
