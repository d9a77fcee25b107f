"""SD3 / SD3.5 (Medium, Large, Large Turbo): flow matching, 16-channel latents, real CFG, trained at 1024 px.

Recognised by ComfyUI's ``SD3`` model config class on exactly ``model_base.SD3`` (its ``MMDiT`` network, no
RoPE); captured on the joint blocks (``dit_capture``, kind "mmdit"). Refused: another latent format, extra input
channels, and the network patched to a discrete (eps / v) schedule.
"""

from __future__ import annotations

from ...zerocon_core.method.denoiser import DIT_DEFAULT_CROSS_BLOCKS, DIT_DEFAULT_FEATURE_BLOCKS
from .adapter import FamilyAdapter, GuidedLayers, Recognition
from .flow_checks import flow_family

SD3 = FamilyAdapter(
    name="SD3",
    rank=40,
    label="SD3/SD3.5",
    load_label="SD3/SD3.5",
    recognition=Recognition(config="comfy.supported_models.SD3", model_base="comfy.model_base.SD3"),
    latent_format="comfy.latent_formats.SD3",
    latent_channels=16,
    native_size=1024,
    tiny_decoder="taesd3",
    capture="mmdit",
    # maps from joint blocks spread over the second half of the stack; features the same over the whole depth
    guided_layers=GuidedLayers(
        cross=("joint",),
        features=("joint",),
        cross_count=DIT_DEFAULT_CROSS_BLOCKS,
        feature_count=DIT_DEFAULT_FEATURE_BLOCKS,
    ),
    text_layout="SD3",
    detect=flow_family,
)

ADAPTERS = (SD3,)
