"""What the nodes know of a MODEL once its family is detected (``ModelFamily``), and the rules every family shares:
the prediction type of a sampling object, the training-size warning and the distilled-guidance cfg warning. The
"unsupported" error naming the supported families is the registry's (``registry.unsupported``, re-exported)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ...zerocon_core.method import parameterization
from ...zerocon_core.method.auto_weights import auto_weight, weight_scale
from ...zerocon_core.method.guidance import CrossAttentionGuidance
from .registry import UnsupportedModelError as UnsupportedModelError
from .registry import adapter_named, unsupported
from .registry import article as article

#: An image with more than this many times the native pixel count (1.5 x the native side, squared) is warned about.
OVERSIZE_AREA = 2.25


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
    def adapter(self):
        """The registered ``FamilyAdapter`` of this family (``KeyError`` for a name none has)."""
        return adapter_named(self.name)

    @property
    def is_flow(self) -> bool:
        """A flow-matching family (SD3, Flux): ``x = (1 - t) x0 + t n``, the model predicts a velocity."""
        return parameterization.is_flow(self.prediction_type)

    @property
    def guidance_scale(self) -> float:
        """Factor on the default ("auto") guidance weights (``zerocon_core.method.auto_weights``): 1 eps, 0.1 v."""
        return weight_scale(self.prediction_type)

    @property
    def default_cross_attention_weight(self) -> float:
        """The auto cross-attention weight: 0.1 for eps-prediction models, 0.01 for v-prediction."""
        return auto_weight(CrossAttentionGuidance, self.prediction_type)

    @property
    def tiny_decoder(self) -> str:
        """ComfyUI's name of the family's tiny decoder (Load VAE): taesd, taesdxl, taesd3 or taef1."""
        return self.adapter.tiny_decoder

    @property
    def native_size(self) -> int:
        """Side, in pixels, of the square images the family was trained at (SD1.x 512, SD2.x 512 / 768-v, SDXL 1024)."""
        return self.adapter.native(self.prediction_type)

    @property
    def latent_scale(self) -> int:
        """Pixels per latent cell (the VAE's downscale factor)."""
        return self.adapter.latent_scale

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
    scale = family.latent_scale
    height, width = int(latent_shape[-2]) * scale, int(latent_shape[-1]) * scale
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


def prediction_type(model_sampling) -> str:
    """ "eps" or "v" for a discrete-schedule model_sampling object, "flow" for a flow-matching one (CONST);
    raises ``UnsupportedModelError`` otherwise."""
    import comfy.model_sampling as ms

    if isinstance(model_sampling, ms.CONST):  # flow matching (SD3, Flux): x_t = (1 - t) x0 + t eps
        return "flow"
    name = type(model_sampling).__name__
    if not isinstance(model_sampling, ms.ModelSamplingDiscrete):
        raise unsupported(f"sampled with {name} (ZeroCon needs a discrete DDPM noise schedule)")
    for cls_name in ("StableCascadeSampling", "ModelSamplingDiscreteEDM"):
        cls = getattr(ms, cls_name, None)
        if cls is not None and isinstance(model_sampling, cls):
            raise unsupported(f"sampled with {cls_name}")
    if isinstance(model_sampling, getattr(ms, "EDM", ())) or isinstance(model_sampling, getattr(ms, "X0", ())):
        raise unsupported("an EDM / x0-prediction model")
    if isinstance(model_sampling, ms.V_PREDICTION):
        return "v"
    if isinstance(model_sampling, ms.EPS):
        return "eps"
    raise unsupported(f"a {name} (neither eps- nor v-prediction)")
