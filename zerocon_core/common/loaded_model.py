"""What every loaded helper model (BLIP, CLIP for metrics) tells about where it runs."""

from __future__ import annotations

import torch


class OnModelDevice:
    """``device`` and ``dtype`` of ``self.model``'s first parameter (a mixin for the loaded-model records)."""

    model: torch.nn.Module

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype
