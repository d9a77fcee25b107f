"""Chroma: flow matching on Flux's 16-channel latents, T5 text only, real CFG, trained at 1024 px.

Recognised by ComfyUI's ``Chroma`` model config class on exactly ``model_base.Chroma`` (Chroma Radiance, its
pixel-space subclass, is another model). Its network (``comfy.ldm.chroma.model.Chroma``) is not a Flux subclass
but is built from Flux's double / single stream blocks, with their modulations computed by an approximator and
handed to each block as ``vec``, under the same ``patches_replace["dit"]`` keys: captured as Flux is
(``dit_capture``, kind "flux"), whose RoPE needs ComfyUI's torch paths in gradient passes. The conditioning is
T5-XXL tokens with no pooled output (Flux's T5 part); an attention mask in the conditioning reaches the joint
attention and the captured maps are normalised under it (``dit_capture.kernel_mask``). No guidance embedding:
cfg is real CFG. Refused: another latent format, the network patched to a discrete (eps / v) schedule.
"""

from __future__ import annotations

from .adapter import FamilyAdapter, Recognition
from .flow_checks import flow_family, unet_config
from .flux import flux_block_adapter
from .model_family import ModelFamily


def _detect(adapter: FamilyAdapter, model, base) -> ModelFamily:
    """The flow checks; Chroma's config counts the input channels of a whole patch (``patch_size`` squared cells)."""
    patch = int(unet_config(base).get("patch_size", 2))
    return flow_family(adapter, model, base, packed=patch * patch)


CHROMA = flux_block_adapter(
    name="Chroma",
    rank=55,
    label="Chroma",
    load_label="Chroma",
    recognition=Recognition(config="comfy.supported_models.Chroma", model_base="comfy.model_base.Chroma"),
    detect=_detect,
)

ADAPTERS = (CHROMA,)
