"""Which ComfyUI models the ZeroCon samplers support, detected from the MODEL (a ModelPatcher).

One adapter per family, one module per family (or group of families sharing a network): ``sd_unet.py``
(SD1.x, SD2.x, SDXL), ``sd3.py`` (SD3 / SD3.5), ``flux.py`` (Flux.1 dev / schnell / Kontext), ``chroma.py``
(Chroma), ``qwen_image.py`` (Qwen-Image / Qwen-Image-Edit), ``z_image.py`` (Z-Image Turbo / base). Each adapter
(``adapter.FamilyAdapter``) states how the family is recognised (ComfyUI's model config class and model_base
class, never tensor shapes), its latent format, channels and scale, native size, tiny decoder, capture code,
default guided layers, text layout, gradient-pass needs and its clear errors. The registry
(``registry.py``) finds every module of this package that exports ``ADAPTERS``: adding a family means adding
one module (docs/families.md).

Supported:

- VP diffusion UNets: SD1.x, SD2.x (eps or v-prediction) and SDXL (and its distilled variants: SSD-1B, Vega,
  KOALA), i.e. the 4-channel latent UNets with cross-attention and a discrete DDPM noise table, where
  pix2pix-zero's DDIM inversion and cross-attention guidance apply;
- flow-matching MM-DiTs (prediction type "flow", 16-channel latents, trained at 1024 px): SD3 / SD3.5
  (``model_base.SD3``, real CFG) and Flux (``model_base.Flux``): Flux-dev-like models (a guidance embedding)
  are guidance-distilled (cfg 1, the guidance value in the conditioning, as FluxGuidance sets it),
  Flux-schnell-like ones have none (cfg 1 or real CFG); Qwen-Image (``model_base.QwenImage``, latents
  (B, 16, 1, H, W)) and Z-Image (``ZImage`` on ``model_base.Lumina2``);
- Chroma (``model_base.Chroma``: Flux's blocks with modulations from an approximator, T5 text only, real CFG).

Everything else (Stable Cascade, video models, inpainting / fill / instruct-pix2pix / unCLIP / upscaler
variants, Chroma Radiance, Flux.2 and other Flux derivatives, other DiTs, EDM sampling) raises
``UnsupportedModelError`` naming the supported families.
"""

from __future__ import annotations

from .adapter import LATENT_SCALE, FamilyAdapter
from .model_family import (
    OVERSIZE_AREA,
    ModelFamily,
    UnsupportedModelError,
    article,
    cfg_warning,
    prediction_type,
    size_warning,
)
from .registry import REGISTRY, adapter_named, capture_code, detect_family, needs_torch_paths, supported_text

#: The supported families as the "unsupported" error names them (the registered adapters, by rank).
SUPPORTED = supported_text()
#: Side (pixels) of the square images each family was trained at, where the prediction type does not change it.
NATIVE_SIZE = {a.name: a.native_size for a in REGISTRY.adapters() if not a.native_sizes}
#: SD2.x by prediction type: eps is SD 2.x-base (512), v is 768-v.
NATIVE_SIZE_SD2 = {p: adapter_named("SD2.x").native(p) for p in ("eps", "v")}

__all__ = [
    "LATENT_SCALE",
    "NATIVE_SIZE",
    "NATIVE_SIZE_SD2",
    "OVERSIZE_AREA",
    "REGISTRY",
    "SUPPORTED",
    "FamilyAdapter",
    "ModelFamily",
    "UnsupportedModelError",
    "adapter_named",
    "article",
    "capture_code",
    "cfg_warning",
    "detect_family",
    "needs_torch_paths",
    "prediction_type",
    "size_warning",
]
