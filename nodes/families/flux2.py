"""Flux.2 (dev with Mistral 3, Klein 4B / 9B with Qwen3, and Klein's edit mode): flow matching, 128-channel
latents at 1/16 of the image side, trained at 1024 px.

Recognised by ComfyUI's ``Flux2`` model config class on exactly ``model_base.Flux2``. Its network is ComfyUI's
Flux network with global modulation (one modulation for all blocks), SiLU-gated MLPs and a 4-axis RoPE whose text
positions sit on axis 3; the guided blocks and their captures are Flux's (``dit_capture``, kind "flux"). The text is
the LLM's hidden states: ``model_base.Flux2`` left-pads a conditioning shorter than 512 tokens with zeros (dev's
Mistral), Klein's tokenizer pads on the right to 512 with its pad token. The maps keep every text column, padding
included, as pix2pix-zero keeps CLIP's padding tokens: cross-attention guidance compares column i with column i,
so it needs a source and an edit of the same token count (docs/families.md). Reference latents (Klein's edit
mode) are extra keys after the image tokens, as Kontext's. Refused: extra input channels, another latent format,
the network patched to a discrete (eps / v) schedule.
"""

from __future__ import annotations

from .adapter import FamilyAdapter, GradientPasses, Recognition
from .flow_checks import txt_in_width
from .flux import FLUX_BLOCK_LAYERS, detect_flux_network
from .model_family import ModelFamily

#: Side in pixels of one Flux.2 latent cell: its VAE downsamples by 8 into 32 channels, packed 2 x 2 into 128.
FLUX2_LATENT_SCALE = 16


def _detect(adapter: FamilyAdapter, model, base) -> ModelFamily:
    """Flux.2-dev (a guidance embedding: cfg 1) or Klein (real CFG)."""
    return detect_flux_network(adapter, model, base, ("dev", "Klein"))


FLUX2 = FamilyAdapter(
    name="Flux.2",
    rank=52,
    label="Flux.2",
    load_label="Flux.2 (dev or Klein)",
    recognition=Recognition(config="comfy.supported_models.Flux2", model_base="comfy.model_base.Flux2"),
    latent_format="comfy.latent_formats.Flux2",
    latent_channels=128,
    latent_scale=FLUX2_LATENT_SCALE,
    native_size=1024,
    tiny_decoder="taef2",
    capture="flux",
    guided_layers=FLUX_BLOCK_LAYERS,
    text_layout="Flux.2",
    gradient=GradientPasses(torch_paths=True, rope=True),
    context_width=txt_in_width,
    detect=_detect,
)

ADAPTERS = (FLUX2,)
