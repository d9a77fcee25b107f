"""Tiny models and inputs of the families added for 2026 (Flux.1 Kontext), built from ComfyUI's own classes.

Kontext is the Flux.1 network (``model_base.Flux``) with reference latents in the conditioning, as ComfyUI's
ReferenceLatent node sets them (``reference_latents``: a list of 16-channel latents, appended to the
conditioning's values); ``model_base.Flux.extra_conds`` turns them into ``ref_latents``, whose tokens the network
appends after the image tokens (RoPE index 1, the "offset" method). The builders of the network itself are
``tiny_models``' (seeded random weights under inference mode, as a loader builds them).
"""

from __future__ import annotations

import tiny_models as tm
import torch


def reference_latent(seed: int = 40, height: int = 12, width: int = 16) -> torch.Tensor:
    """A 16-channel reference LATENT's samples (1, 16, height, width): on purpose not the image's size, so its
    token count differs from the image's."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, height, width, generator=gen)


def kontext_conditioning(seed: int, reference: torch.Tensor | None = None, tokens: int = 16, guidance=3.5):
    """A Flux-dev CONDITIONING with ``reference`` in ``reference_latents`` (ReferenceLatent's key), as a Kontext
    workflow hands it to the sampler."""
    cond = tm.flow_conditioning(seed, tokens=tokens, guidance=guidance)
    ref = reference_latent() if reference is None else reference
    return [[cond[0][0], {**cond[0][1], "reference_latents": [ref]}]]
