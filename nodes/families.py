"""Which ComfyUI models the ZeroCon samplers support, detected from the MODEL (a ModelPatcher).

Supported:

- VP diffusion UNets: SD1.x, SD2.x (eps or v-prediction) and SDXL (and its distilled variants: SSD-1B, Vega,
  KOALA), i.e. the 4-channel latent UNets with cross-attention and a discrete DDPM noise table, where
  pix2pix-zero's DDIM inversion and cross-attention guidance apply;
- flow-matching MM-DiTs (prediction type "flow", 16-channel latents, trained at 1024 px): SD3 / SD3.5
  (``model_base.SD3``, real CFG) and Flux (``model_base.Flux``): Flux-dev-like models (a guidance embedding)
  are guidance-distilled (cfg 1, the guidance value in the conditioning, as FluxGuidance sets it),
  Flux-schnell-like ones have none (cfg 1 or real CFG).

Everything else (Stable Cascade, video models, inpainting / fill / instruct-pix2pix / unCLIP / upscaler
variants, Chroma and other Flux derivatives, other DiTs, EDM sampling) raises ``UnsupportedModelError``
naming the supported families.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..zerocon_core import parameterization
from ..zerocon_core.auto_weights import auto_weight, weight_scale
from ..zerocon_core.guidance import CrossAttentionGuidance

SUPPORTED = "SD1.x, SD2.x (eps or v-prediction), SDXL, SD3/SD3.5 and Flux"


#: Side (pixels) of the square images each family was trained at; SD2.x eps is SD 2.x-base (512), v is 768-v.
NATIVE_SIZE = {"SD1.x": 512, "SDXL": 1024, "SD3": 1024, "Flux": 1024}
NATIVE_SIZE_SD2 = {"eps": 512, "v": 768}
#: An image with more than this many times the native pixel count (1.5 x the native side, squared) is warned about.
OVERSIZE_AREA = 2.25
#: Pixels per latent cell (the VAE's downscale factor, 8 for every supported family, Flux and SD3 included).
LATENT_SCALE = 8


class UnsupportedModelError(ValueError):
    """The MODEL is not one the ZeroCon samplers can run."""


@dataclass(frozen=True)
class ModelFamily:
    """``name``: "SD1.x", "SD2.x", "SDXL", "SD3" (SD3 / SD3.5) or "Flux"; ``prediction_type``: "eps", "v" or
    "flow"; ``cfg_style``: "cfg" (real CFG) or "distilled" (Flux-dev: cfg 1 and the conditioning's guidance
    value); ``variant``: a note shown with the name ("dev" / "schnell" for Flux), else ""."""

    name: str
    prediction_type: str
    latent_channels: int = 4
    cfg_style: str = "cfg"
    variant: str = ""

    @property
    def is_flow(self) -> bool:
        """A flow-matching family (SD3, Flux): ``x = (1 - t) x0 + t n``, the model predicts a velocity."""
        return parameterization.is_flow(self.prediction_type)

    @property
    def guidance_scale(self) -> float:
        """Factor on the default ("auto") guidance weights (``zerocon_core.auto_weights``): 1 eps, 0.1 v."""
        return weight_scale(self.prediction_type)

    @property
    def default_cross_attention_weight(self) -> float:
        """The auto cross-attention weight: 0.1 for eps-prediction models, 0.01 for v-prediction."""
        return auto_weight(CrossAttentionGuidance, self.prediction_type)

    @property
    def tiny_decoder(self) -> str:
        """ComfyUI's name of the family's tiny decoder (Load VAE): taesd, taesdxl, taesd3 or taef1."""
        return {"SDXL": "taesdxl", "SD3": "taesd3", "Flux": "taef1"}.get(self.name, "taesd")

    @property
    def native_size(self) -> int:
        """Side, in pixels, of the square images the family was trained at (SD1.x 512, SD2.x 512 / 768-v, SDXL 1024)."""
        if self.name == "SD2.x":
            return NATIVE_SIZE_SD2[self.prediction_type]
        return NATIVE_SIZE[self.name]

    def __str__(self) -> str:
        if self.is_flow:
            kind = "flow matching, guidance-distilled" if self.cfg_style == "distilled" else "flow matching"
            return f"{self.name}{'-' + self.variant if self.variant else ''} ({kind})"
        return f"{self.name} ({'v-prediction' if self.prediction_type == 'v' else 'eps-prediction'})"


def size_warning(family: ModelFamily, latent_shape) -> str | None:
    """The warning for a latent ``(B, C, H, W)`` far above the family's training size, or None.

    "Far above": more than ``OVERSIZE_AREA`` (2.25) times the native pixel count, i.e. beyond 768 x 768 on
    SD1.x. Every ZeroCon sampler checks its latent with this one rule.
    """
    height, width = int(latent_shape[-2]) * LATENT_SCALE, int(latent_shape[-1]) * LATENT_SCALE
    side = family.native_size
    ratio = height * width / float(side * side)
    if ratio <= OVERSIZE_AREA:
        return None
    return (
        f"ZeroCon: the image is {width}x{height} px, {ratio:.1f} x the pixels of the {side}x{side} images "
        f"{family.name} was trained at. Each step costs at least {ratio:.1f} x the time and memory of a {side} px "
        f"image (self-attention up to {ratio * ratio:.0f} x), and far above its training size the model repeats "
        f"subjects and loses the layout, so the inversion, the edit and the reconstruction degrade. Edit at about "
        f"{side} px (scale the image down first, upscale the result)."
    )


def article(name: str) -> str:
    """ "an" before a family name read letter by letter (an SD1.x, an SDXL), else "a" (a Flux)."""
    return "an" if name.startswith("SD") else "a"


def cfg_warning(family: ModelFamily, cfg: float, node: str) -> str | None:
    """Log and return a warning when ``cfg`` is not 1 on a guidance-distilled family (Flux-dev), else None.

    Flux-dev is distilled for one forward per step with the guidance value in the conditioning (ComfyUI's
    FluxGuidance); a cfg other than 1 still works (real CFG on top, two forwards per step) but is rarely wanted."""
    if family.cfg_style != "distilled" or cfg == 1.0:
        return None
    text = (
        f"{node}: {family} is guidance-distilled: use cfg 1 and set the guidance value on the conditionings with "
        f"FluxGuidance; cfg {cfg:g} adds real CFG on top (two forwards per step)"
    )
    logging.getLogger("zerocon").warning(text)
    return text


def _unsupported(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"ZeroCon supports {SUPPORTED} models only; this MODEL is {what}. "
        "Load an SD1.x, SD2.x, SDXL, SD3/SD3.5 or Flux (dev or schnell) checkpoint (LoRAs and other model patches "
        "are fine)."
    )


def _model_config_family(config) -> str | None:
    """The family from ComfyUI's model config class (comfy.supported_models), or None if unknown."""
    import comfy.supported_models as sm

    excluded = tuple(
        getattr(sm, n)
        for n in (
            "SD15_instructpix2pix",
            "SDXL_instructpix2pix",
            "SD21UnclipL",
            "SD21UnclipH",
            "SD_X4Upscaler",
            "LotusD",
        )
        if hasattr(sm, n)
    )
    if isinstance(config, excluded):
        raise _unsupported(f"a {type(config).__name__} model (a variant that needs extra image inputs)")
    if isinstance(config, sm.SDXL):
        return "SDXL"
    if isinstance(config, sm.SD20):
        return "SD2.x"
    if isinstance(config, sm.SD15):
        return "SD1.x"
    return None


def _unet_config_family(unet_config: dict) -> str | None:
    """Fallback for model configs of other classes (custom loaders): judge by the UNet's shape."""
    ctx = unet_config.get("context_dim")
    adm = unet_config.get("adm_in_channels")
    if ctx == 768 and adm is None:
        return "SD1.x"
    if ctx == 1024 and adm is None:
        return "SD2.x"
    if ctx == 2048 and adm == 2816:
        return "SDXL"
    return None


def prediction_type(model_sampling) -> str:
    """ "eps" or "v" for a discrete-schedule model_sampling object, "flow" for a flow-matching one (CONST);
    raises ``UnsupportedModelError`` otherwise."""
    import comfy.model_sampling as ms

    if isinstance(model_sampling, ms.CONST):  # flow matching (SD3, Flux): x_t = (1 - t) x0 + t eps
        return "flow"
    name = type(model_sampling).__name__
    if not isinstance(model_sampling, ms.ModelSamplingDiscrete):
        raise _unsupported(f"sampled with {name} (ZeroCon needs a discrete DDPM noise schedule)")
    for cls_name in ("StableCascadeSampling", "ModelSamplingDiscreteEDM"):
        cls = getattr(ms, cls_name, None)
        if cls is not None and isinstance(model_sampling, cls):
            raise _unsupported(f"sampled with {cls_name}")
    if isinstance(model_sampling, getattr(ms, "EDM", ())) or isinstance(model_sampling, getattr(ms, "X0", ())):
        raise _unsupported("an EDM / x0-prediction model")
    if isinstance(model_sampling, ms.V_PREDICTION):
        return "v"
    if isinstance(model_sampling, ms.EPS):
        return "eps"
    raise _unsupported(f"a {name} (neither eps- nor v-prediction)")


def detect_family(model) -> ModelFamily:
    """The ``ModelFamily`` of a MODEL (ModelPatcher), or ``UnsupportedModelError`` naming what is supported."""
    import comfy.latent_formats as lf
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    base = getattr(model, "model", None)
    if base is None:
        raise _unsupported(f"a {type(model).__name__}, not a ComfyUI MODEL")
    diffusion = getattr(base, "diffusion_model", None)
    flow = _flow_family(model, base)
    if flow is not None:
        return flow
    if not isinstance(diffusion, UNetModel):
        raise _unsupported(f"a {type(diffusion).__name__} network ({type(base).__name__})")
    config = getattr(base, "model_config", None)
    unet_config = dict(getattr(config, "unet_config", {}) or {})
    if unet_config.get("use_temporal_attention") or unet_config.get("use_temporal_resblock"):
        raise _unsupported("a video UNet")
    if unet_config.get("in_channels", 4) != 4 or getattr(base, "concat_keys", ()):
        raise _unsupported("an inpainting / image-conditioned variant (extra input channels)")
    name = _model_config_family(config) or _unet_config_family(unet_config)
    if name is None:
        raise _unsupported(f"an unrecognised UNet ({type(config).__name__})")
    fmt = base.latent_format
    expected = lf.SDXL if name == "SDXL" else lf.SD15
    if type(fmt) is not expected:
        raise _unsupported(f"a {name}-shaped UNet with the {type(fmt).__name__} latent format")
    ptype = prediction_type(model.get_model_object("model_sampling"))
    if ptype == "flow":
        raise _unsupported(f"a {name} UNet patched to flow-matching sampling (ZeroCon needs its DDPM schedule)")
    return ModelFamily(name=name, prediction_type=ptype)


def _flow_family(model, base) -> ModelFamily | None:
    """The ``ModelFamily`` of a Flux or SD3 MODEL, None for any other network; ``UnsupportedModelError`` for a
    Flux / SD3 variant ZeroCon cannot run (extra input channels, another latent format, another sampling)."""
    import comfy.latent_formats as lf
    import comfy.model_base as mb

    kind = type(base)  # exact: Chroma and other subclasses of Flux are other models
    if kind is mb.Flux:
        name, fmt = "Flux", lf.Flux
    elif kind is mb.SD3:
        name, fmt = "SD3", lf.SD3
    else:
        return None
    config = getattr(base, "model_config", None)
    unet_config = dict(getattr(config, "unet_config", {}) or {})
    if unet_config.get("in_channels", 16) != 16:
        raise _unsupported(f"a {name} variant with {unet_config.get('in_channels')} input channels (fill / inpainting)")
    if type(base.latent_format) is not fmt:
        raise _unsupported(f"a {name} network with the {type(base.latent_format).__name__} latent format")
    ptype = prediction_type(model.get_model_object("model_sampling"))
    if ptype != "flow":
        raise _unsupported(f"a {name} network sampled as {ptype}-prediction (ZeroCon needs its flow sampling)")
    if name == "SD3":
        return ModelFamily(name="SD3", prediction_type="flow", latent_channels=16)
    params = getattr(base.diffusion_model, "params", None)
    distilled = bool(getattr(params, "guidance_embed", unet_config.get("guidance_embed", False)))
    return ModelFamily(
        name="Flux",
        prediction_type="flow",
        latent_channels=16,
        cfg_style="distilled" if distilled else "cfg",
        variant="dev" if distilled else "schnell",
    )
