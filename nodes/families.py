"""Which ComfyUI models the ZeroCon samplers support, detected from the MODEL (a ModelPatcher).

Supported: SD1.x, SD2.x (eps or v-prediction) and SDXL (and its distilled variants: SSD-1B, Vega,
KOALA), i.e. the 4-channel latent UNets with cross-attention and a discrete DDPM noise table, where
pix2pix-zero's DDIM inversion and cross-attention guidance apply. Everything else (SD3, Flux, Stable
Cascade, video models, inpainting / instruct-pix2pix / unCLIP / upscaler variants, EDM or flow sampling)
raises ``UnsupportedModelError`` naming the supported families.
"""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED = "SD1.x, SD2.x (eps or v-prediction) and SDXL"

#: Guidance step-size factor per prediction type. pix2pix-zero's cross-attention step is 0.1 for
#: SD1.x (eps); its authors advise 0.01 or less for v-prediction models (gradient explosion):
#: docs/method.md §5.
GUIDANCE_SCALE = {"eps": 1.0, "v": 0.1}


class UnsupportedModelError(ValueError):
    """The MODEL is not one the ZeroCon samplers can run."""


@dataclass(frozen=True)
class ModelFamily:
    """``name``: "SD1.x", "SD2.x" or "SDXL"; ``prediction_type``: "eps" or "v"."""

    name: str
    prediction_type: str
    latent_channels: int = 4

    @property
    def guidance_scale(self) -> float:
        """Factor applied to the default ("auto") guidance weights: 1 for eps, 0.1 for v-prediction."""
        return GUIDANCE_SCALE[self.prediction_type]

    @property
    def default_cross_attention_weight(self) -> float:
        """0.1 for eps-prediction models, 0.01 for v-prediction (docs/method.md §5)."""
        return 0.1 * self.guidance_scale

    def __str__(self) -> str:
        return f"{self.name} ({'v-prediction' if self.prediction_type == 'v' else 'eps-prediction'})"


def _unsupported(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"ZeroCon supports {SUPPORTED} models only; this MODEL is {what}. "
        "Load an SD1.x, SD2.x or SDXL checkpoint (LoRAs and other model patches are fine)."
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
    """ "eps" or "v" for a discrete-schedule model_sampling object; raises ``UnsupportedModelError`` otherwise."""
    import comfy.model_sampling as ms

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
    return ModelFamily(name=name, prediction_type=prediction_type(model.get_model_object("model_sampling")))
