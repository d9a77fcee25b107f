"""Flux.1 (dev, schnell, Krea, and Kontext): flow matching, 16-channel latents, trained at 1024 px.

Recognised by ComfyUI's ``Flux`` model config class (``Flux``, ``FluxSchnell``) on exactly ``model_base.Flux``:
its subclasses (Chroma, its own adapter in ``chroma.py``; Flux.2 in ``flux2.py``; LongCat-Image) are other models. Flux-dev-like networks (a guidance embedding)
are guidance-distilled (cfg 1, the guidance value in the conditioning, as FluxGuidance sets it); Flux-schnell-like
ones have none (cfg 1 or real CFG). Flux.1 Kontext is the same class with reference latents in the conditioning:
their tokens follow the image's and are extra keys for the captures. Captured on the double / single blocks
(``dit_capture``, kind "flux"), whose RoPE needs ComfyUI's torch paths in gradient passes. Refused: Flux Fill /
inpainting (extra input channels), another latent format, the network patched to a discrete (eps / v) schedule.
"""

from __future__ import annotations

from ...zerocon_core.method.denoiser import DIT_DEFAULT_CROSS_BLOCKS, DIT_DEFAULT_FEATURE_BLOCKS
from .adapter import FamilyAdapter, GradientPasses, GuidedLayers, Recognition
from .flow_checks import check_flow_network, unet_config
from .model_family import ModelFamily


def detect_flux_network(adapter: FamilyAdapter, model, base, variants: tuple[str, str]) -> ModelFamily:
    """The flow checks, then the variant of a network of Flux's blocks: ``variants[0]`` with a guidance embedding
    (guidance-distilled: cfg 1, the guidance in the conditioning), ``variants[1]`` without (real CFG)."""
    check_flow_network(adapter, model, base)
    params = getattr(base.diffusion_model, "params", None)
    distilled = bool(getattr(params, "guidance_embed", unet_config(base).get("guidance_embed", False)))
    return ModelFamily(
        name=adapter.name,
        prediction_type="flow",
        latent_channels=adapter.latent_channels,
        cfg_style="distilled" if distilled else "cfg",
        variant=variants[0] if distilled else variants[1],
    )


def _detect(adapter: FamilyAdapter, model, base) -> ModelFamily:
    """Flux.1-dev (a guidance embedding) or schnell."""
    return detect_flux_network(adapter, model, base, ("dev", "schnell"))


#: The default guided layers of a network of Flux's double / single stream blocks (Flux, Chroma): maps from the
#: double-stream blocks over the second half of that stack; features over the second half of the whole depth.
FLUX_BLOCK_LAYERS = GuidedLayers(
    cross=("double",),
    features=("double", "single"),
    cross_count=DIT_DEFAULT_CROSS_BLOCKS,
    feature_count=DIT_DEFAULT_FEATURE_BLOCKS,
)


def flux_block_adapter(**family) -> FamilyAdapter:
    """The ``FamilyAdapter`` of a network of Flux's double / single blocks on Flux's 16-channel latents (Flux,
    Chroma): 1024 px, taef1, the "flux" capture code and its RoPE; ``family`` gives the rest (name, rank, labels,
    recognition, detect)."""
    return FamilyAdapter(
        latent_format="comfy.latent_formats.Flux",
        latent_channels=16,
        native_size=1024,
        tiny_decoder="taef1",
        capture="flux",
        guided_layers=FLUX_BLOCK_LAYERS,
        text_layout="Flux",
        gradient=GradientPasses(torch_paths=True, rope=True),
        **family,
    )


FLUX = flux_block_adapter(
    name="Flux",
    rank=50,
    label="Flux",
    load_label="Flux (dev or schnell)",
    recognition=Recognition(config="comfy.supported_models.Flux", model_base="comfy.model_base.Flux"),
    detect=_detect,
)

ADAPTERS = (FLUX,)
