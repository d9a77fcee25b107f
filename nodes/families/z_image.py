"""Z-Image (Turbo and base): flow matching, 16-channel Flux-VAE latents at 8x, trained at 1024 px.

Recognised by ComfyUI's ``ZImage`` model config class on exactly ``model_base.Lumina2`` with its ``NextDiT``
network: one stream of joint attention over [caption; image] tokens after a context and a noise refiner. Captured by
``joint_capture`` (kind "lumina": the main layers' joint attention through an attention override that reads
ComfyUI's ``block_index``, features from the ``double_block`` post-hook); its RoPE (with the QK-norm, a fused
comfy-kitchen op) needs ComfyUI's torch paths in gradient passes. Z-Image-Turbo is distilled for cfg 1 without a
guidance embedding, the base model takes real CFG: both are "cfg" style. Refused: the pixel-space variant
(``model_base.ZImagePixelSpace``), Lumina 2.0 (``Lumina2`` config), another latent format or input channels, the
network patched to a discrete (eps / v) schedule.
"""

from __future__ import annotations

from ...zerocon_core.method.denoiser import DIT_DEFAULT_CROSS_BLOCKS, DIT_DEFAULT_FEATURE_BLOCKS
from .adapter import FamilyAdapter, GradientPasses, GuidedLayers, Recognition
from .flow_checks import flow_family


def _context_width(base) -> int:
    """The conditioning width the network takes (its caption embedder's input: 2560, Qwen3-4B's hidden size)."""
    return int(base.diffusion_model.cap_embedder[1].in_features)


Z_IMAGE = FamilyAdapter(
    name="Z-Image",
    rank=57,
    label="Z-Image",
    load_label="Z-Image (Turbo or base)",
    recognition=Recognition(
        config="comfy.supported_models.ZImage",
        model_base="comfy.model_base.Lumina2",
        network="comfy.ldm.lumina.model.NextDiT",
    ),
    latent_format="comfy.latent_formats.Flux",
    latent_channels=16,
    native_size=1024,
    tiny_decoder="taef1",
    capture="lumina",
    # maps and features from main layers spread over the second half of the stack
    guided_layers=GuidedLayers(
        cross=("joint",),
        features=("joint",),
        cross_count=DIT_DEFAULT_CROSS_BLOCKS,
        feature_count=DIT_DEFAULT_FEATURE_BLOCKS,
    ),
    text_layout="Z-Image",
    context_width=_context_width,
    gradient=GradientPasses(torch_paths=True, rope=True),
    detect=flow_family,
)

ADAPTERS = (Z_IMAGE,)
