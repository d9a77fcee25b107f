"""The UNet families: SD1.x, SD2.x (eps or v-prediction) and SDXL (with its distilled variants SSD-1B, Vega, KOALA).

4-channel latent UNets with cross-attention and a discrete DDPM noise table, where pix2pix-zero's DDIM
inversion and cross-attention guidance apply. Recognised by ComfyUI's model config class (``SD15``, ``SD20``,
``SDXL`` and their subclasses) on an openaimodel ``UNetModel``; captured with attn2 replace / attn1 output
patches (``comfy_denoiser``). Refused: video UNets, variants with extra input channels (inpainting,
instruct-pix2pix, Zero123), unCLIP, the x4 upscaler and Lotus (variants that need extra image inputs), UNets of
other config classes whatever their shapes, and a UNet patched to flow-matching sampling.
"""

from __future__ import annotations

from ...zerocon_core.method.denoiser import BLOCKS
from .adapter import FamilyAdapter, GuidedLayers, Recognition, is_instance
from .model_family import ModelFamily, prediction_type, unsupported

UNET = "comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel"
#: Latent channels of every UNet family (more input channels: an image-conditioned variant).
CHANNELS = 4
#: Cross-attention maps from every attn2 layer (pix2pix-zero), PatchNCE features from the up blocks (ours).
UNET_LAYERS = GuidedLayers(cross=BLOCKS, features=("up",))


def _unet_config(base) -> dict:
    return dict(getattr(getattr(base, "model_config", None), "unet_config", {}) or {})


def _gate(base) -> None:
    """The refusals every UNet gets before its family is named: video UNets, extra input channels."""
    unet_config = _unet_config(base)
    if unet_config.get("use_temporal_attention") or unet_config.get("use_temporal_resblock"):
        raise unsupported("a video UNet")
    if unet_config.get("in_channels", CHANNELS) != CHANNELS or getattr(base, "concat_keys", ()):
        raise unsupported("an inpainting / image-conditioned variant (extra input channels)")


def _detect(adapter: FamilyAdapter, model, base) -> ModelFamily:
    """The UNet family's checks, in order: the gate, refused variants, latent format, DDPM sampling."""
    _gate(base)
    config = base.model_config
    if adapter.refused_config(config):
        raise unsupported(f"a {type(config).__name__} model (a variant that needs extra image inputs)")
    fmt = base.latent_format
    if not adapter.has_latent_format(fmt):
        raise unsupported(f"a {adapter.name}-shaped UNet with the {type(fmt).__name__} latent format")
    ptype = prediction_type(model.get_model_object("model_sampling"))
    if ptype == "flow":
        raise unsupported(f"a {adapter.name} UNet patched to flow-matching sampling (ZeroCon needs its DDPM schedule)")
    return ModelFamily(name=adapter.name, prediction_type=ptype, latent_channels=adapter.latent_channels)


def refuse_unclaimed(base) -> None:
    """A UNet that no UNet adapter recognises: the gate's refusals, else "an unrecognised UNet" (its config class)."""
    if not is_instance(getattr(base, "diffusion_model", None), UNET):
        return
    _gate(base)
    raise unsupported(f"an unrecognised UNet ({type(getattr(base, 'model_config', None)).__name__})")


def _unet_family(name: str, rank: int, config: str, latent_format: str, label: str = "", **settings) -> FamilyAdapter:
    """A UNet family's adapter: config class and latent format by their names in ComfyUI, the rest shared."""
    return FamilyAdapter(
        name=name,
        rank=rank,
        label=label or name,
        load_label=name,
        recognition=Recognition(config=f"comfy.supported_models.{config}", network=UNET),
        latent_format=f"comfy.latent_formats.{latent_format}",
        latent_channels=CHANNELS,
        capture="unet",
        guided_layers=UNET_LAYERS,
        text_layout=name,
        detect=_detect,
        **settings,
    )


SD1 = _unet_family(
    "SD1.x",
    rank=10,
    config="SD15",
    latent_format="SD15",
    native_size=512,
    tiny_decoder="taesd",
    refused_configs=("comfy.supported_models.SD15_instructpix2pix",),
)
SD2 = _unet_family(
    "SD2.x",
    rank=20,
    config="SD20",
    latent_format="SD15",
    label="SD2.x (eps or v-prediction)",
    native_size=512,  # SD 2.x-base; the 768-v model was trained at 768
    native_sizes=(("v", 768),),
    tiny_decoder="taesd",
    refused_configs=tuple(
        f"comfy.supported_models.{n}" for n in ("SD21UnclipL", "SD21UnclipH", "SD_X4Upscaler", "LotusD")
    ),
)
SDXL = _unet_family(
    "SDXL",
    rank=30,
    config="SDXL",  # and its distilled variants: SSD1B, Segmind_Vega, KOALA_*
    latent_format="SDXL",
    native_size=1024,
    tiny_decoder="taesdxl",
    refused_configs=("comfy.supported_models.SDXL_instructpix2pix",),
)

ADAPTERS = (SD1, SD2, SDXL)
