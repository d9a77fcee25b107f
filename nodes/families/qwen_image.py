"""Qwen-Image (and Qwen-Image-Edit): flow matching, 16-channel Wan-2.1 latents at 8x, trained at 1328 px.

Recognised by ComfyUI's ``QwenImage`` model config class on exactly ``model_base.QwenImage`` (its
``QwenImageTransformer2DModel``: double-stream blocks only). Its latents carry a frame axis of 1, (B, 16, 1, H, W),
as ComfyUI samples them. Captured on the double-stream blocks (``dit_capture``, kind "qwen"): [txt; img] joint
attention with a (B, 1, L) additive mask on padded text, RoPE (a comfy-kitchen op: ComfyUI's torch paths in
gradient passes). Qwen-Image-Edit puts the reference latents' tokens after the image's in the image stream: the
maps' queries stay on the image grid, the softmax runs over every key. Refused: another number of input
channels, another latent format, the network patched to a discrete (eps / v) schedule, and the older Qwen-Image of
a ComfyUI without ``model_management.in_training`` (no text mask; feature detection).
"""

from __future__ import annotations

from ...zerocon_core.method.denoiser import DIT_DEFAULT_CROSS_BLOCKS, DIT_DEFAULT_FEATURE_BLOCKS
from .adapter import FamilyAdapter, GradientPasses, GuidedLayers, Recognition
from .flow_checks import flow_family, txt_in_width, unet_config
from .model_family import ModelFamily, unsupported


def _detect(adapter: FamilyAdapter, model, base) -> ModelFamily:
    """This ComfyUI's Qwen-Image is the tested one, then input channels (16 latent channels in 2 x 2 patches),
    the Wan-2.1 latent format, flow sampling."""
    import comfy.model_management

    name = adapter.name
    if not hasattr(comfy.model_management, "in_training"):
        # feature detection: the Qwen-Image that came with comfy-kitchen's torch-path switch masks padded text and is
        # the one the captures are tested against; the older one ignores the text mask
        raise unsupported(
            f"the {name} of a ComfyUI without the torch-path switch model_management.in_training (its older "
            f"{name} network ignores the text mask; update ComfyUI)"
        )
    patch = int(unet_config(base).get("patch_size", 2))
    return flow_family(adapter, model, base, packed=patch * patch, channels_note="")


QWEN_IMAGE = FamilyAdapter(
    name="Qwen-Image",
    rank=55,
    label="Qwen-Image",
    load_label="Qwen-Image / Qwen-Image-Edit",
    recognition=Recognition(config="comfy.supported_models.QwenImage", model_base="comfy.model_base.QwenImage"),
    latent_format="comfy.latent_formats.Wan21",
    latent_channels=16,
    native_size=1328,
    tiny_decoder="lighttaew2_1",
    capture="qwen",
    # maps and features from double-stream blocks spread over the second half of the stack
    guided_layers=GuidedLayers(
        cross=("double",),
        features=("double",),
        cross_count=DIT_DEFAULT_CROSS_BLOCKS,
        feature_count=DIT_DEFAULT_FEATURE_BLOCKS,
    ),
    text_layout="Qwen-Image",
    gradient=GradientPasses(torch_paths=True, rope=True),
    frame_axis=True,
    context_width=txt_in_width,
    detect=_detect,
)

ADAPTERS = (QWEN_IMAGE,)
