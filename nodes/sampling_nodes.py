"""Sampling nodes: DDIM inversion, the guided sampler, and a GUIDER + SAMPLER pair for SamplerCustomAdvanced.

Everything runs through ComfyUI's own sampling path (``CFGGuider.sample``): model loading, latent
scaling (process_latent_in/out), conditioning processing, hooks and wrappers are ComfyUI's. Our code is
the ``KSAMPLER`` function, which hands a ``ComfyDenoiser`` to the engine (``zerocon_core.inversion.
ddim_invert`` / ``zerocon_core.sampler.guided_ddim_sample``). Sigmas are ComfyUI's ``ddim_uniform`` grid:
inversion runs up its flipped copy (``FlipSigmas``), sampling back down the grid itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import comfy.samplers
import torch
from comfy_api.latest import io

from ..zerocon_core.inversion import NoiseRegularization, ddim_invert
from ..zerocon_core.sampler import BRANCHES, STEP_MODES, guided_ddim_sample
from ..zerocon_core.schedule import check_steps, inversion_sigmas
from . import progress
from .comfy_denoiser import ComfyDenoiser
from .families import ModelFamily, detect_family
from .guidance_nodes import GUIDANCE, resolve_weights

logger = logging.getLogger("zerocon")

CATEGORY = "image/translation/zerocon"
INVERSION = io.Custom("ZEROCON_INVERSION")


# -- the data on a ZEROCON_INVERSION link -------------------------------------------------------------


@dataclass(frozen=True)
class InversionData:
    """What DDIM Inversion hands to the guided sampler.

    ``latent``: x_T as a LATENT tensor (VAE scale, like every LATENT), CPU. ``sigmas``: the descending
    DDIM grid to sample back with (ComfyUI ``ddim_uniform``, ``steps + 1`` levels ending at 0), CPU.
    ``source``: the conditioning the inversion used (the sampler's default source). ``family``: the model
    family name; ``model_key``: identity of the inverted model's weights (a mismatch is only warned about).
    """

    latent: torch.Tensor
    sigmas: torch.Tensor
    source: Any
    family: str = ""
    prediction_type: str = "eps"
    model_key: int = 0
    regularization: NoiseRegularization | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.latent.shape)


@dataclass(frozen=True)
class InversionSettings:
    cfg: float = 1.0
    regularization: NoiseRegularization | None = None
    seed: int = 0


@dataclass
class GuidedSettings:
    step_mode: str = "raw"
    step_size: float = 0.02
    branches: str = "edit"
    seed: int | None = None
    keep_reference: bool = False
    #: filled by the sampler function: the reconstruction (sigma space), skipped steps, losses per step
    results: dict = field(default_factory=dict)


# -- validation -------------------------------------------------------------------------------------


def _cond_batches(conditioning) -> set[int]:
    sizes = set()
    for entry in conditioning or []:
        if isinstance(entry, (list, tuple)) and entry and isinstance(entry[0], torch.Tensor):
            sizes.add(int(entry[0].shape[0]))
            extra = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            pooled = extra.get("pooled_output")
            if isinstance(pooled, torch.Tensor):
                sizes.add(int(pooled.shape[0]))
    return sizes


def check_conditioning(conditioning, batch: int, what: str) -> None:
    """A CONDITIONING must hold one row (shared by the batch) or one row per latent in the batch."""
    if conditioning is None:
        return
    if not isinstance(conditioning, list) or not conditioning:
        raise ValueError(f"ZeroCon: the {what} conditioning is empty or not a CONDITIONING")
    bad = sorted(b for b in _cond_batches(conditioning) if b not in (1, batch))
    if bad:
        raise ValueError(
            f"ZeroCon: batch mismatch: the latent batch has {batch} image(s) but the {what} conditioning has "
            f"batch {bad[0]}; use a conditioning of batch 1 (shared) or {batch} (one per image)"
        )


def check_latent(samples: torch.Tensor, family: ModelFamily) -> None:
    if samples.ndim != 4 or samples.shape[1] != family.latent_channels:
        raise ValueError(
            f"ZeroCon: {family.name} needs a {family.latent_channels}-channel image latent (B, 4, H, W); got shape "
            f"{tuple(samples.shape)} (encode the image with this model's VAE)"
        )


def check_family(model, inversion: InversionData) -> ModelFamily:
    family = detect_family(model)
    if inversion.family and inversion.family != family.name:
        raise ValueError(
            f"ZeroCon: the inversion was made with an {inversion.family} model but this MODEL is {family.name}; "
            "invert and sample with the same model"
        )
    if inversion.model_key and inversion.model_key != id(model.model):
        logger.warning("ZeroCon: sampling with a different model than the one the latent was inverted with")
    return family


def check_inversion_latent(inversion: InversionData, samples: torch.Tensor) -> None:
    if tuple(samples.shape) != inversion.shape:
        raise ValueError(
            f"ZeroCon: the inversion latent size {list(inversion.shape)} differs from the LATENT "
            f"{list(samples.shape)} (B, C, H, W); sample the latent that DDIM Inversion returned, at its size"
        )


# -- KSAMPLER functions (run inside CFGGuider.sample) ----------------------------------------------------


def _denoiser(guider, extra_args: dict) -> ComfyDenoiser:
    patcher = guider.model_patcher
    modules = [guider.inner_model]
    for m in getattr(guider, "loaded_models", None) or []:  # ControlNets and other models used by the conds
        inner = getattr(m, "model", None)
        if isinstance(inner, torch.nn.Module) and all(inner is not x for x in modules):
            modules.append(inner)
    return ComfyDenoiser(
        guider.inner_model,
        extra_args.get("model_options", {}),
        model_sampling=patcher.get_model_object("model_sampling"),
        autograd_modules=modules,
    )


def _no_mask(extra_args: dict, name: str) -> None:
    if extra_args.get("denoise_mask") is not None:
        logger.warning("ZeroCon %s: the latent's noise mask is ignored (the whole image is processed)", name)


def inversion_function(
    model, x, sigmas, extra_args=None, callback=None, disable=None, settings: InversionSettings = None
):
    """KSAMPLER function: deterministic DDIM inversion up the ascending ``sigmas`` (Euler at the current level)."""
    extra_args = extra_args or {}
    settings = settings or InversionSettings()
    guider = model.inner_model
    _no_mask(extra_args, "DDIM Inversion")
    denoiser = _denoiser(guider, extra_args)
    conds = guider.conds
    negative = conds.get("negative") if settings.cfg != 1.0 else None
    with torch.inference_mode(False):  # the noise regulariser differentiates w.r.t. the predicted noise
        x, sigmas = x.clone(), sigmas.clone()
        inv = ddim_invert(
            denoiser,
            x,
            sigmas,
            conds["positive"],
            negative_cond=negative,
            cfg=settings.cfg,
            eval_at="current",
            regularization=settings.regularization,
            seed=settings.seed,
            keep_trajectory=False,
            callback=progress.inversion_callback(callback, sigmas),
            check_interrupt=progress.check_interrupt,
        )
    return inv.latent


def guided_function(model, x, sigmas, extra_args=None, callback=None, disable=None, settings: GuidedSettings = None):
    """KSAMPLER function: pix2pix-zero(Con)'s guided DDIM loop, reading conds and guidance from a ZeroConGuider."""
    extra_args = extra_args or {}
    settings = settings or GuidedSettings()
    guider = model.inner_model
    if not isinstance(guider, ZeroConGuider):
        raise ValueError(
            f"ZeroCon Guided DDIM Sampler needs the ZeroCon Guider as its GUIDER (it reads the source "
            f"conditioning and the guidance from it); got {type(guider).__name__}"
        )
    _no_mask(extra_args, "guided sampler")
    for what, cond in guider.conditionings.items():
        check_conditioning(cond, x.shape[0], what)
    family = detect_family(guider.model_patcher)
    terms = resolve_weights(guider.guidance, family)
    denoiser = _denoiser(guider, extra_args)
    conds = guider.conds
    seed = settings.seed if settings.seed is not None else (extra_args.get("seed") or 0)
    with torch.inference_mode(False):  # the latent must be able to require grad
        x, sigmas = x.clone(), sigmas.clone()
        result = guided_ddim_sample(
            denoiser,
            x,
            sigmas,
            source_cond=conds["source"],
            edit_cond=conds["positive"],
            negative_cond=None if guider.negative_is_source else conds["negative"],
            cfg=guider.cfg,
            guidance=terms,
            step_mode=settings.step_mode,
            step_size=settings.step_size,
            branches=settings.branches,
            keep_reference=settings.keep_reference,
            seed=seed,
            callback=progress.sampling_callback(callback, sigmas),
            check_interrupt=progress.check_interrupt,
        )
    settings.results.update(reference=result.reference, skipped=list(result.skipped), losses=list(result.losses))
    return result.latent


# -- guider ------------------------------------------------------------------------------------------


class ZeroConGuider(comfy.samplers.CFGGuider):
    """CFG between ``negative`` and ``positive`` (= the edit), plus an extra ``source`` cond and guidance terms.

    With a stock sampler it is plain CFG on the edit; the ZeroCon Guided DDIM Sampler reads the source
    conditioning (processed by ComfyUI like the others) and the guidance from it.
    """

    guidance: tuple = ()
    negative_is_source: bool = True
    conditionings: dict = {}

    def set_zerocon(self, edit, source, negative=None, cfg: float = 5.0, guidance=()) -> None:
        self.negative_is_source = negative is None
        self.conditionings = {"edited": edit, "source": source, "negative": negative}
        self.inner_set_conds({"positive": edit, "negative": source if negative is None else negative, "source": source})
        self.set_cfg(cfg)
        self.guidance = tuple(guidance or ())


def _run(guider, sampler, latent_samples: torch.Tensor, sigmas: torch.Tensor, model, seed: int) -> torch.Tensor:
    import comfy.model_management

    callback = progress.node_callback(model, len(sigmas) - 1)
    noise = torch.zeros(latent_samples.shape, dtype=latent_samples.dtype, device="cpu")
    out = guider.sample(
        noise,
        latent_samples,
        sampler,
        sigmas,
        callback=callback,
        disable_pbar=not progress.progress_enabled(),
        seed=seed,
    )
    return out.to(comfy.model_management.intermediate_device())


def _latent_out(latent: dict, samples: torch.Tensor) -> dict:
    out = {k: v for k, v in latent.items() if k != "noise_mask"}
    out["samples"] = samples
    return out


# -- nodes -------------------------------------------------------------------------------------------


class ZeroConDDIMInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZeroConDDIMInversion",
            display_name="ZeroCon DDIM Inversion",
            category=CATEGORY,
            description=(
                "Deterministic DDIM inversion of an image latent (pix2pix-zero): runs the model up the flipped "
                "ddim_uniform sigmas with the caption, optionally regularising the predicted noise. The LATENT output "
                "is x_T: a stock SamplerCustom (add_noise off, the SIGMAS output, cfg 1, the caption) reconstructs the "
                "image from it."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The Stable Diffusion model (SD1.x, SD2.x or SDXL) to invert with."),
                io.Latent.Input("latent", tooltip="The image latent to invert (VAE Encode of the source image)."),
                io.Conditioning.Input(
                    "conditioning",
                    tooltip="The source caption's conditioning (e.g. a BLIP caption through CLIP Text Encode).",
                ),
                io.Int.Input(
                    "steps",
                    default=50,
                    min=1,
                    max=1000,
                    tooltip="DDIM steps (pix2pix-zero: 50). Sample with the same steps.",
                ),
                io.Float.Input(
                    "cfg",
                    default=1.0,
                    min=0.0,
                    max=30.0,
                    step=0.1,
                    round=0.01,
                    tooltip="Classifier-free guidance during inversion. 1 = the caption alone (pix2pix-zero); other "
                    "values need a negative.",
                ),
                io.Boolean.Input(
                    "regularize",
                    default=True,
                    tooltip="pix2pix-zero's noise regularisation (auto-correlation + KL) of each predicted noise.",
                ),
                io.Float.Input(
                    "lambda_ac",
                    default=20.0,
                    min=0.0,
                    max=1000.0,
                    step=0.5,
                    tooltip="Weight of the auto-correlation regulariser.",
                ),
                io.Float.Input(
                    "lambda_kl",
                    default=20.0,
                    min=0.0,
                    max=1000.0,
                    step=0.5,
                    tooltip="Weight of the KL (unit Gaussian) regulariser.",
                ),
                io.Int.Input(
                    "reg_outer",
                    default=5,
                    min=0,
                    max=100,
                    tooltip="Regularisation rounds per step (each: auto-correlation steps, then one KL step).",
                ),
                io.Int.Input(
                    "reg_rolls",
                    default=5,
                    min=1,
                    max=100,
                    tooltip="Auto-correlation gradient steps per round (random shifts).",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="Seeds the regulariser's random shifts (the inversion itself is deterministic).",
                ),
                io.Conditioning.Input(
                    "negative",
                    optional=True,
                    tooltip="Negative conditioning, used only when cfg is not 1.",
                ),
            ],
            outputs=[
                io.Latent.Output(display_name="latent", tooltip="x_T, the inverted latent (start of sampling)."),
                INVERSION.Output(display_name="inversion", tooltip="Inversion data for the ZeroCon Guided Sampler."),
                io.Sigmas.Output(
                    display_name="sigmas",
                    tooltip="The DDIM sigmas to sample back with (for SamplerCustom / SamplerCustomAdvanced).",
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        model,
        latent,
        conditioning,
        steps,
        cfg,
        regularize,
        lambda_ac,
        lambda_kl,
        reg_outer,
        reg_rolls,
        seed,
        negative=None,
    ) -> io.NodeOutput:
        import comfy.sample

        family = detect_family(model)
        check_steps(int(steps), len(model.get_model_object("model_sampling").sigmas))
        samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        check_latent(samples, family)
        batch = samples.shape[0]
        check_conditioning(conditioning, batch, "caption")
        check_conditioning(negative, batch, "negative")
        if cfg != 1.0 and negative is None:
            raise ValueError("ZeroCon DDIM Inversion: cfg other than 1 needs a negative conditioning")
        reg = NoiseRegularization(lambda_ac, lambda_kl, int(reg_outer), int(reg_rolls)) if regularize else None

        ms = model.get_model_object("model_sampling")
        sampling = comfy.samplers.calculate_sigmas(ms, "ddim_uniform", int(steps)).cpu()
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(conditioning, negative if negative is not None else conditioning)
        guider.set_cfg(cfg)
        settings = InversionSettings(cfg=float(cfg), regularization=reg, seed=int(seed))
        sampler = comfy.samplers.KSAMPLER(inversion_function, extra_options={"settings": settings})
        x_t = _run(guider, sampler, samples, inversion_sigmas(sampling), model, int(seed))

        data = InversionData(
            latent=x_t,
            sigmas=sampling,
            source=conditioning,
            family=family.name,
            prediction_type=family.prediction_type,
            model_key=id(model.model),
            regularization=reg,
        )
        return io.NodeOutput(_latent_out(latent, x_t), data, sampling.clone())


class ZeroConGuidedSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZeroConGuidedSampler",
            display_name="ZeroCon Guided Sampler",
            category=CATEGORY,
            description=(
                "pix2pix-zero(Con) editing: from the inverted latent, a reference branch reconstructs the source "
                "while the edit branch samples with the edited conditioning (CFG against the caption by default) and, "
                "at each step, takes one gradient step on its latent so that its attention maps / features stay close "
                "to the reference's (the guidance chain)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model used for the inversion (LoRAs and patches apply)."),
                INVERSION.Input("inversion", tooltip="The output of ZeroCon DDIM Inversion."),
                io.Conditioning.Input(
                    "edited", tooltip="The edited conditioning (e.g. the caption moved by an edit direction)."
                ),
                io.Float.Input(
                    "cfg",
                    default=5.0,
                    min=0.0,
                    max=30.0,
                    step=0.1,
                    round=0.01,
                    tooltip="Classifier-free guidance between the negative (default: the source caption) and the edit "
                    "(pix2pix-zero: 5).",
                ),
                io.Combo.Input(
                    "step_mode",
                    options=list(STEP_MODES),
                    default="raw",
                    tooltip="raw: the latent moves by weight x gradient (pix2pix-zero); normalized: the gradient is "
                    "rescaled to RMS step_size (robust across models and resolutions).",
                ),
                io.Float.Input(
                    "step_size",
                    default=0.02,
                    min=0.0,
                    max=10.0,
                    step=0.001,
                    round=0.0001,
                    tooltip="RMS size of the guidance step in normalized mode (ignored in raw mode).",
                ),
                io.Combo.Input(
                    "branches",
                    options=list(BRANCHES),
                    default="edit",
                    tooltip="edit: guide the edited forward only (faster); both: also the negative one, losses averaged "
                    "(pix2pix-zero's batch of two).",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="Seeds the guidance's random choices (PatchNCE sample locations); sampling itself is deterministic.",
                ),
                io.Conditioning.Input(
                    "source",
                    optional=True,
                    tooltip="The source caption's conditioning; default: the one the inversion used.",
                ),
                io.Conditioning.Input(
                    "negative",
                    optional=True,
                    tooltip="Negative conditioning for CFG; default: the source caption (pix2pix-zero for real images).",
                ),
                GUIDANCE.Input(
                    "guidance",
                    optional=True,
                    tooltip="Guidance terms (cross-attention, PatchNCE...); none = plain DDIM edit.",
                ),
                io.Latent.Input(
                    "latent",
                    optional=True,
                    tooltip="Start from this latent instead of the inversion's x_T (same size as the inversion).",
                ),
            ],
            outputs=[
                io.Latent.Output(display_name="edit", tooltip="The edited latent."),
                io.Latent.Output(
                    display_name="reconstruction", tooltip="The reference branch: the source reconstructed from x_T."
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        model,
        inversion,
        edited,
        cfg,
        step_mode,
        step_size,
        branches,
        seed,
        source=None,
        negative=None,
        guidance=None,
        latent=None,
    ) -> io.NodeOutput:
        import comfy.model_management

        if not isinstance(inversion, InversionData):
            raise ValueError("ZeroCon Guided Sampler: 'inversion' must come from ZeroCon DDIM Inversion")
        family = check_family(model, inversion)
        base = latent if latent is not None else {"samples": inversion.latent}
        samples = base["samples"]
        check_inversion_latent(inversion, samples)
        check_latent(samples, family)
        source = inversion.source if source is None else source
        for cond, what in ((edited, "edited"), (source, "source"), (negative, "negative")):
            check_conditioning(cond, samples.shape[0], what)

        guider = ZeroConGuider(model)
        guider.set_zerocon(edited, source, negative, cfg=float(cfg), guidance=guidance)
        settings = GuidedSettings(
            step_mode=step_mode, step_size=float(step_size), branches=branches, seed=int(seed), keep_reference=True
        )
        sampler = comfy.samplers.KSAMPLER(guided_function, extra_options={"settings": settings})
        edit = _run(guider, sampler, samples, inversion.sigmas, model, int(seed))
        ref = settings.results.get("reference")
        if ref is None:
            raise RuntimeError("ZeroCon Guided Sampler: the reference branch did not run")
        ref = model.model.process_latent_out(ref.detach().to(torch.float32)).to(
            comfy.model_management.intermediate_device()
        )
        return io.NodeOutput(_latent_out(base, edit), _latent_out(base, ref))


class ZeroConGuiderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZeroConGuider",
            display_name="ZeroCon Guider",
            category=CATEGORY,
            description=(
                "A GUIDER for SamplerCustomAdvanced: CFG on the edit plus the source conditioning and guidance that "
                "the ZeroCon Guided DDIM Sampler needs. Use DisableNoise, the inversion's SIGMAS and its x_T latent."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model used for the inversion."),
                io.Conditioning.Input("edited", tooltip="The edited conditioning."),
                io.Conditioning.Input(
                    "source", tooltip="The source caption's conditioning (the one the latent was inverted with)."
                ),
                io.Float.Input(
                    "cfg",
                    default=5.0,
                    min=0.0,
                    max=30.0,
                    step=0.1,
                    round=0.01,
                    tooltip="Classifier-free guidance scale (pix2pix-zero: 5).",
                ),
                io.Conditioning.Input(
                    "negative", optional=True, tooltip="Negative conditioning; default: the source caption."
                ),
                GUIDANCE.Input("guidance", optional=True, tooltip="Guidance terms; none = plain DDIM edit."),
            ],
            outputs=[io.Guider.Output(display_name="guider", tooltip="Use with the ZeroCon Guided DDIM Sampler.")],
        )

    @classmethod
    def execute(cls, model, edited, source, cfg, negative=None, guidance=None) -> io.NodeOutput:
        detect_family(model)
        guider = ZeroConGuider(model)
        guider.set_zerocon(edited, source, negative, cfg=float(cfg), guidance=guidance)
        return io.NodeOutput(guider)


class ZeroConGuidedDDIMSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZeroConGuidedDDIMSampler",
            display_name="ZeroCon Guided DDIM Sampler",
            category=CATEGORY,
            description=(
                "A SAMPLER for SamplerCustomAdvanced running pix2pix-zero(Con)'s guided DDIM loop. Needs the ZeroCon "
                "Guider; use DisableNoise and the inversion's SIGMAS."
            ),
            inputs=[
                io.Combo.Input(
                    "step_mode",
                    options=list(STEP_MODES),
                    default="raw",
                    tooltip="raw: weight x gradient (pix2pix-zero); normalized: gradient rescaled to RMS step_size.",
                ),
                io.Float.Input(
                    "step_size",
                    default=0.02,
                    min=0.0,
                    max=10.0,
                    step=0.001,
                    round=0.0001,
                    tooltip="RMS size of the guidance step in normalized mode.",
                ),
                io.Combo.Input(
                    "branches",
                    options=list(BRANCHES),
                    default="edit",
                    tooltip="edit: guide the edited forward only; both: also the negative one.",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="Seeds the guidance's random choices.",
                ),
            ],
            outputs=[
                io.Sampler.Output(
                    display_name="sampler", tooltip="Use with the ZeroCon Guider in SamplerCustomAdvanced."
                )
            ],
        )

    @classmethod
    def execute(cls, step_mode, step_size, branches, seed) -> io.NodeOutput:
        settings = GuidedSettings(step_mode=step_mode, step_size=float(step_size), branches=branches, seed=int(seed))
        return io.NodeOutput(comfy.samplers.KSAMPLER(guided_function, extra_options={"settings": settings}))


NODES = [ZeroConDDIMInversion, ZeroConGuidedSampler, ZeroConGuiderNode, ZeroConGuidedDDIMSampler]
