"""Sampling nodes: DDIM inversion, the guided sampler, and a GUIDER + SAMPLER pair for SamplerCustomAdvanced.

Everything runs through ComfyUI's own sampling path (``CFGGuider.sample``): model loading, latent
scaling (process_latent_in/out), conditioning processing, hooks and wrappers are ComfyUI's. Our code is
two ``KSAMPLER`` functions, which hand a ``ComfyDenoiser`` to the engine: ``inversion_function``
(``zerocon_core.method.inversion.ddim_invert``) and ``guided_function`` (``zerocon_core.method.sampler.guided_ddim_sample``,
shared by the Guided Sampler, the Guided DDIM Sampler and the DiffuseIT Sampler). Sigmas are ComfyUI's
``ddim_uniform`` grid (VP models) or its ``simple`` grid over the model's own shifted flow sigmas (Flux, SD3):
inversion runs up its flipped copy (``FlipSigmas``), sampling back down the grid itself; with the "next"
convention (diffusers', VP models only) the grid's last level is the model's ``sigma_min`` instead of 0
(``ddim_grid``). ``ZeroConKSampler`` runs both functions, keeping ComfyUI's noise scaling except where it does
not apply to an inverted flow latent (see there).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import comfy.samplers
import torch
from comfy_api.latest import io, ui

from ...zerocon_core.method.diagnostics import chart, summarize, summary, too_many_skipped
from ...zerocon_core.method.inversion import EVAL_AT, Inversion, NoiseRegularization, check_eval_at, ddim_invert
from ...zerocon_core.method.replay import REFERENCES, RecordSettings, merged_request
from ...zerocon_core.method.sampler import BRANCHES, SamplerSettings, guided_ddim_sample
from ...zerocon_core.method.schedule import check_steps, inversion_sigmas
from ..families import ModelFamily, article, cfg_warning, detect_family, prediction_type, size_warning
from ..families.comfy_denoiser import ComfyDenoiser
from ..glue import progress
from ..glue.inputs import CATEGORY, GUIDANCE, cfg_input, schema, seed_input, step_inputs, steps_input
from .guidance_nodes import resolve_weights

logger = logging.getLogger("zerocon")

INVERSION = io.Custom("ZEROCON_INVERSION")
GUIDED_SEED = (
    "Seeds the random choices guidance terms make while sampling; the cross-attention and PatchNCE terms make none "
    "(PatchNCE's sample locations come from the PatchNCE node's location_seed, so that DDIM Inversion can record them). "
    "Sampling itself is deterministic."
)
BRANCHES_TOOLTIP = (
    "What the guidance step moves. edit: the latent, by the gradient of its edited forward only (fastest). both: "
    "the latent, by the gradient of its negative and edited forwards, losses averaged. pix2pix-zero: pix2pix-zero's "
    "own update: one copy of the latent per CFG half, each moved by its half of the averaged loss, the negative's "
    "copy carried on (the same weight moves it about 0.6x as far as edit or both); with step_mode raw it is exactly "
    "pix2pix-zero's update."
)
REFERENCE_TOOLTIP = (
    "Where the reference maps come from. inverted: the inversion's own latents and the captures DDIM Inversion "
    "recorded for its guidance input (one UNet pass fewer per step; Direct Inversion's source branch); it falls "
    "back to resampled, with a log line, when the inversion recorded nothing or for other guidance, steps, model "
    "or source, used the next convention or CFG, or a separate negative is used. resampled: a reconstruction "
    "denoised in lockstep with the edit."
)


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
    #: for the "inverted" reference: the engine's inversion (its ascending sigmas, trajectory and record, CPU;
    #: latents in sigma space as the KSAMPLER saw them) and the guidance terms it recorded for (as connected)
    replay: Inversion | None = None
    recorded_for: tuple = ()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.latent.shape)


@dataclass(frozen=True)
class InversionSettings:
    cfg: float = 1.0
    regularization: NoiseRegularization | None = None
    seed: int = 0
    #: where the model is queried each step: "current" (FlipSigmas + ddim) or "next" (DDIMInverseScheduler)
    eval_at: str = "current"
    #: what to record for the guided sampler's "inverted" reference (None: nothing, no trajectory kept)
    record: RecordSettings | None = None


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


def check_conditionings(named: dict[str, Any], batch: int, family: ModelFamily, model) -> None:
    """Each named CONDITIONING (None: not connected) of a node feeding ``model`` of ``family``: tokens of the width
    the family's network takes, where its adapter states it (``context_width``), and ``check_conditioning``."""
    reader = family.adapter.context_width
    width = reader(model.model) if reader is not None else None
    for what, conditioning in named.items():
        if width is not None:
            _check_context_width(conditioning, width, family, what)
        check_conditioning(conditioning, batch, what)


def _check_context_width(conditioning, width: int, family: ModelFamily, what: str) -> None:
    if not isinstance(conditioning, list):
        return
    for entry in conditioning:
        if isinstance(entry, (list, tuple)) and entry and isinstance(entry[0], torch.Tensor):
            got = int(entry[0].shape[-1])
            if got != width:
                raise ValueError(
                    f"ZeroCon: the {what} conditioning is {got} wide but this {family.name} MODEL takes {width}-wide "
                    f"text (its {family.adapter.text_layout} text encoder): encode the prompt with the CLIP loaded "
                    f"for {family.name}"
                )


def check_latent(samples: torch.Tensor, family: ModelFamily) -> str | None:
    """Raise for a latent the family cannot take; log and return the warning for one far above its training size."""
    adapter = family.adapter
    if not adapter.takes_latent_shape(samples.shape):
        raise ValueError(
            f"ZeroCon: {family.name} needs a {family.latent_channels}-channel image latent "
            f"{adapter.latent_shape_text()}; got shape {tuple(samples.shape)} (encode the image with this "
            "model's VAE)"
        )
    warning = size_warning(family, samples.shape)
    if warning:
        logger.warning(warning)
    return warning


def model_key(patcher) -> int:
    """Identity of the weights sampling with ``patcher`` runs: the patcher's model, or, where ComfyUI (0.33's
    Dynamic VRAM with hooked conditioning) samples with a non-dynamic delegate, the delegate's shared model."""
    delegate = getattr(patcher, "non_dynamic_delegate_model", None)
    return id(delegate[0]) if delegate else id(patcher.model)


def check_family(model, inversion: InversionData) -> ModelFamily:
    family = detect_family(model)
    if inversion.family and inversion.family != family.name:
        raise ValueError(
            f"ZeroCon: the inversion was made with {article(inversion.family)} {inversion.family} model but this MODEL "
            f"is {family.name}; "
            f"invert and sample with the same model (a {family.name} MODEL needs a latent inverted with {family.name})"
        )
    if inversion.model_key and inversion.model_key != model_key(model):
        logger.warning("ZeroCon: sampling with a different model than the one the latent was inverted with")
    return family


def check_inversion_latent(inversion: InversionData, samples: torch.Tensor) -> None:
    if tuple(samples.shape) != inversion.shape:
        raise ValueError(
            f"ZeroCon: the inversion latent size {list(inversion.shape)} differs from the LATENT "
            f"{list(samples.shape)} (B, C, H, W); sample the latent that DDIM Inversion returned, at its size"
        )


# -- KSAMPLER functions (run inside CFGGuider.sample) ----------------------------------------------------


class ZeroConKSampler(comfy.samplers.KSAMPLER):
    """ComfyUI's ``KSAMPLER``, except for flow models (CONST): a descending grid with zero noise starts from the
    latent as it is (the inverted x_T, already at ``sigmas[0]``), and an ascending grid (inversion) returns the
    latent unscaled at its top level (ComfyUI's scaling would zero a latent at sigma 1; docs/nodes-internals.md)."""

    def sample(
        self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False
    ):
        model_sampling = model_wrap.inner_model.model_sampling
        if prediction_type(model_sampling) != "flow" or len(sigmas) < 2:
            return super().sample(
                model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar
            )
        extra_args["denoise_mask"] = denoise_mask
        model_k = comfy.samplers.KSamplerX0Inpaint(model_wrap, sigmas)
        model_k.latent_image = latent_image
        model_k.noise = noise
        ascending = bool(sigmas[-1] > sigmas[0])
        if not ascending and latent_image is not None and not bool(noise.any()):
            x = latent_image
        else:
            x = model_sampling.noise_scaling(sigmas[0], noise, latent_image, self.max_denoise(model_wrap, sigmas))
        k_callback = None
        total_steps = len(sigmas) - 1
        if callback is not None:
            k_callback = lambda d: callback(d["i"], d["denoised"], d["x"], total_steps)  # noqa: E731
        samples = self.sampler_function(
            model_k, x, sigmas, extra_args=extra_args, callback=k_callback, disable=disable_pbar, **self.extra_options
        )
        if not ascending:
            samples = model_sampling.inverse_noise_scaling(sigmas[-1], samples)
        return samples


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
    model, x, sigmas, extra_args=None, callback=None, disable=None, settings: InversionSettings = None, sink=None
):
    """KSAMPLER function: deterministic DDIM inversion up the ascending ``sigmas`` (Euler at the current level).

    ``sink``: a list the engine's ``Inversion`` is appended to (with its trajectory and record when recording)."""
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
            eval_at=settings.eval_at,
            regularization=settings.regularization,
            seed=settings.seed,
            keep_trajectory=False,
            record=settings.record,
            callback=progress.inversion_callback(callback, sigmas),
            check_interrupt=progress.check_interrupt,
        )
    if sink is not None:
        sink.append(inv)
    return inv.latent


def guided_function(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    settings: SamplerSettings = SamplerSettings(),
    sink: list | None = None,
):
    """KSAMPLER function: the guided DDIM loop, reading conds and guidance from a ZeroConGuider.

    ``settings``: the engine's sampler settings (their ``cfg`` replaced by the guider's). Returns the edit in sigma
    space at the last sigma (B images), or with ``settings.keep_reference`` the edit and the reconstruction
    concatenated on the batch axis (2B; ``split_reference``). ``sink``: a list the ``SampleResult`` is appended to.
    """
    extra_args = extra_args or {}
    guider = _zerocon_guider(model)
    _no_mask(extra_args, "guided sampler")
    family = detect_family(guider.model_patcher)
    check_conditionings(guider.conditionings, x.shape[0], family, guider.model_patcher)
    terms = resolve_weights(guider.guidance, family, settings.step_mode)
    denoiser = _denoiser(guider, extra_args)
    wants = bool(terms) and bool(merged_request(terms, denoiser.layers())[1])  # a reference is needed at all
    conds = guider.conds
    with torch.inference_mode(False):  # the latent must be able to require grad
        x, sigmas = x.clone(), sigmas.clone()
        result = guided_ddim_sample(
            denoiser,
            x,
            sigmas,
            source_cond=conds["source"],
            edit_cond=conds["positive"],
            negative_cond=None if guider.negative_is_source else conds["negative"],
            guidance=terms,
            settings=dataclasses.replace(settings, cfg=float(guider.cfg)),
            callback=progress.sampling_callback(callback, sigmas),
            check_interrupt=progress.check_interrupt,
            inversion=replay_source(guider, sigmas) if settings.reference == "inverted" and wants else None,
        )
    return _guided_output(result, settings.keep_reference, sink)


def _zerocon_guider(model) -> ZeroConGuider:
    """The ``ZeroConGuider`` a KSAMPLER function's ``model`` wraps (``ValueError`` for any other GUIDER)."""
    guider = model.inner_model
    if not isinstance(guider, ZeroConGuider):
        raise ValueError(
            f"ZeroCon Guided DDIM Sampler needs the ZeroCon Guider as its GUIDER (it reads the source "
            f"conditioning and the guidance from it); got {type(guider).__name__}"
        )
    return guider


def _guided_output(result, keep_reference: bool, sink: list | None) -> torch.Tensor:
    """Log the run's diagnostics summary (a warning when too many steps were skipped), put ``result`` in
    ``sink``, and return the edit (B) or, with ``keep_reference``, the edit and the reconstruction (2B)."""
    text = summary(result)
    (logger.warning if too_many_skipped(summarize(result)) else logger.info)("ZeroCon guidance: %s", text)
    if sink is not None:
        sink.append(result)
    if keep_reference:
        return torch.cat([result.latent, result.reference])
    return result.latent


def replay_source(guider, sigmas: torch.Tensor) -> Inversion | None:
    """The engine ``Inversion`` whose record the sampler replays, or None (logged; the sampler then runs
    "resampled"). Called only when the guidance needs reference captures. Replay only when the guider's
    inversion recorded for the same guidance terms (as connected, auto weights unresolved: the inversion does
    not know the sampler's step mode, and a weight only decides whether a term is active), the same steps, the
    same model weights and the same source conditioning (the engine checks the convention, the grid and the
    recorded layers)."""
    terms = tuple(guider.guidance)
    data = getattr(guider, "inversion", None)
    replay = data.replay if data is not None else None
    why = ""
    if data is None:
        why = "no inversion reaches the guider (connect DDIM Inversion's 'inversion' output)"
    elif replay is None:
        why = "DDIM Inversion recorded nothing: connect the same guidance to its 'guidance' input"
    elif tuple(data.recorded_for) != tuple(terms):
        why = "the guidance differs from the one DDIM Inversion recorded for"
    elif len(replay.trajectory) != len(sigmas):
        why = f"the inversion has {len(replay.trajectory) - 1} steps, the sampler {len(sigmas) - 1}"
    elif data.model_key and data.model_key != model_key(guider.model_patcher):
        why = "the MODEL differs from the one the inversion recorded with"
    elif guider.conditionings.get("source") is not data.source:
        why = "the source conditioning is not the one the inversion used"
    if why:
        logger.warning("ZeroCon: reference 'inverted' falls back to 'resampled': %s", why)
        return None
    return replay


def diagnostics_outputs() -> list:
    """The guided samplers' last two outputs: the per-step chart and the summary (``diagnostics_of``)."""
    return [
        io.Image.Output(
            display_name="diagnostics",
            tooltip="Per step: each guidance term's loss (scaled per term), the update size, skipped steps in red.",
        ),
        io.String.Output(
            display_name="summary",
            tooltip="At how many steps the guidance was applied, how big the update was, how hard each term pulled "
            "(also shown on the node).",
        ),
    ]


def diagnostics_of(sink: list) -> tuple[torch.Tensor, str]:
    """``(chart IMAGE (1, H, W, 3), summary text)`` of the last guided run ``guided_function`` put in ``sink``."""
    if not sink:  # the sampler did not run (nothing to sample)
        return torch.ones(1, 64, 64, 3), "no guided sampling ran."
    return chart(sink[-1]), summary(sink[-1])


def split_reference(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Undo ``guided_function``'s ``keep_reference`` output: ``(edit, reconstruction)``, B images each."""
    half = samples.shape[0] // 2
    return samples[:half], samples[half:]


# -- guider ------------------------------------------------------------------------------------------


class ZeroConGuider(comfy.samplers.CFGGuider):
    """CFG between ``negative`` and ``positive`` (= the edit), plus an extra ``source`` cond and guidance terms.

    With a stock sampler it is plain CFG on the edit; the ZeroCon Guided DDIM Sampler reads the source
    conditioning (processed by ComfyUI like the others) and the guidance from it.
    """

    guidance: tuple = ()
    negative_is_source: bool = True
    conditionings: dict = {}
    inversion: InversionData | None = None

    def set_zerocon(self, edit, source, negative=None, cfg: float = 5.0, guidance=(), inversion=None) -> None:
        self.negative_is_source = negative is None
        self.conditionings = {"edited": edit, "source": source, "negative": negative}
        self.inner_set_conds({"positive": edit, "negative": source if negative is None else negative, "source": source})
        self.set_cfg(cfg)
        self.guidance = tuple(guidance or ())
        self.inversion = inversion


def sampler_with_sink(function, settings) -> tuple[ZeroConKSampler, list]:
    """A ``ZeroConKSampler`` running the KSAMPLER ``function`` with ``settings``, and the list its run result is
    appended to (``sink``)."""
    sink: list = []
    return ZeroConKSampler(function, extra_options={"settings": settings, "sink": sink}), sink


def run_sampler(guider, sampler, latent_samples: torch.Tensor, sigmas: torch.Tensor, seed: int, noise=None):
    """``guider.sample`` of ``latent_samples`` over ``sigmas`` with the node's progress bar (zero noise unless
    ``noise`` is given); the result on ComfyUI's intermediate device."""
    import comfy.model_management

    callback = progress.node_callback(guider.model_patcher, len(sigmas) - 1)
    if noise is None:
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


def latent_out(latent: dict, samples: torch.Tensor) -> dict:
    """The LATENT ``latent`` with ``samples`` in place of its own and no noise mask."""
    out = {k: v for k, v in latent.items() if k != "noise_mask"}
    out["samples"] = samples
    return out


def checked_latent(model, family: ModelFamily, latent: dict, steps: int, conditionings: dict):
    """``(samples, size warning or None)`` of a LATENT to sample with ``model`` of ``family``, once ``steps``, the
    latent and the named conditionings (None: not connected) passed their checks (empty channels fixed)."""
    import comfy.sample

    check_steps(steps, len(model.get_model_object("model_sampling").sigmas))
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    warning = check_latent(samples, family)
    check_conditionings(conditionings, samples.shape[0], family, model)
    return samples, warning


# -- the DDIM grid -----------------------------------------------------------------------------------

#: The DDIM Inversion node's conventions; each is the engine's ``eval_at`` of the same name.
CONVENTIONS = EVAL_AT


def check_convention(convention: str) -> None:
    """``ValueError`` naming the accepted conventions unless ``convention`` is one of them."""
    if convention not in CONVENTIONS:
        raise ValueError(
            f"ZeroCon DDIM Inversion: convention must be one of {', '.join(CONVENTIONS)}; got {convention!r}"
        )


#: ComfyUI scheduler of the sampling grid per model kind: VP models "ddim_uniform" (DDIM's timesteps), flow models
#: "simple" (ComfyUI's default for Flux and SD3: evenly spaced over the model's own shifted sigma table, 1 -> 0).
GRID_SCHEDULERS = {"vp": "ddim_uniform", "flow": "simple"}


def ddim_grid(model_sampling, steps: int, convention: str = "current") -> torch.Tensor:
    """Descending DDIM sampling sigmas (``steps + 1`` levels, CPU) for ``convention``.

    "current": ComfyUI's ``ddim_uniform`` grid (VP models) or ``simple`` grid (flow models: the model's own
    sampling, its shift included; ``GRID_SCHEDULERS``), down to 0 (inversion then starts at FlipSigmas' 1e-4).
    "next" (VP models only: a flow model is a ``ValueError``): diffusers' DDIM grid for SD's schedulers
    (``set_alpha_to_one=False``): the same levels, but the clean latent sits at the model's first training
    level ``sigma_min`` instead of 0, as diffusers' DDIMScheduler and DDIMInverseScheduler place it.
    """
    check_convention(convention)
    ptype = prediction_type(model_sampling)
    check_eval_at(convention, "ZeroCon DDIM Inversion: convention", ptype)
    scheduler = GRID_SCHEDULERS["flow" if ptype == "flow" else "vp"]
    grid = comfy.samplers.calculate_sigmas(model_sampling, scheduler, int(steps)).cpu()
    if convention == "next" and float(grid[-1]) == 0.0:
        grid = grid.clone()
        grid[-1] = float(model_sampling.sigma_min)
    return grid


# -- nodes -------------------------------------------------------------------------------------------


def _inversion_inputs() -> list:
    """DDIM Inversion's required inputs up to ``cfg``: what is inverted, with which model and caption, in how many
    steps."""
    return [
        io.Model.Input(
            "model", tooltip="The model to invert with (SD1.x, SD2.x, SDXL, SD3/SD3.5 or Flux dev/schnell)."
        ),
        io.Latent.Input("latent", tooltip="The image latent to invert (VAE Encode of the source image)."),
        io.Conditioning.Input(
            "conditioning",
            tooltip="The source caption's conditioning (e.g. a BLIP caption through CLIP Text Encode).",
        ),
        steps_input("DDIM steps (pix2pix-zero: 50). Sample with the same steps."),
        cfg_input(
            1.0,
            "Classifier-free guidance during inversion. 1 = the caption alone (pix2pix-zero); other values "
            "need a negative.",
        ),
    ]


def _regularization_inputs() -> list:
    """``regularize`` and the settings of pix2pix-zero's noise regulariser (``NoiseRegularization``)."""
    weight = dict(default=20.0, min=0.0, max=1000.0, step=0.5)
    rounds = "Regularisation rounds per step (each: auto-correlation steps, then one KL step)."
    return [
        io.Boolean.Input(
            "regularize",
            default=True,
            tooltip="pix2pix-zero's noise regularisation (auto-correlation + KL) of each predicted noise.",
        ),
        io.Float.Input("lambda_ac", **weight, tooltip="Weight of the auto-correlation regulariser."),
        io.Float.Input("lambda_kl", **weight, tooltip="Weight of the KL (unit Gaussian) regulariser."),
        io.Int.Input("reg_outer", default=5, min=0, max=100, tooltip=rounds),
        io.Int.Input(
            "reg_rolls", default=5, min=1, max=100, tooltip="Auto-correlation gradient steps per round (random shifts)."
        ),
    ]


def _inversion_optional_inputs() -> list:
    """DDIM Inversion's optional inputs: ``negative``, ``convention`` and the ``guidance`` to record for."""
    return [
        io.Conditioning.Input("negative", optional=True, tooltip="Negative conditioning, used only when cfg is not 1."),
        io.Combo.Input(
            "convention",
            options=list(CONVENTIONS),
            default="current",
            optional=True,
            tooltip="Where each inversion step queries the model. current: at the level the step starts "
            "from, exactly ComfyUI's FlipSigmas + ddim sampler. next: at the level it goes to, with the "
            "clean latent at the model's first training level, as diffusers' DDIMInverseScheduler "
            "(pix2pix-zero's diffusers pipeline); the SIGMAS output then ends at that level, not 0.",
        ),
        GUIDANCE.Input(
            "guidance",
            optional=True,
            tooltip="The guidance the sampler will use: its reference maps are recorded during the inversion "
            "and replayed by the Guided Sampler / Guider (reference 'inverted'). Not connected: nothing is "
            "recorded and the sampler runs its reference branch.",
        ),
    ]


def _inversion_outputs() -> list:
    """DDIM Inversion's outputs: x_T, the inversion data and the sigmas to sample back with."""
    return [
        io.Latent.Output(display_name="latent", tooltip="x_T, the inverted latent (start of sampling)."),
        INVERSION.Output(display_name="inversion", tooltip="Inversion data for the ZeroCon Guided Sampler."),
        io.Sigmas.Output(
            display_name="sigmas",
            tooltip="The DDIM sigmas to sample back with (for SamplerCustom / SamplerCustomAdvanced).",
        ),
    ]


def _cpu_replay(sink: list) -> Inversion | None:
    """A CPU copy of the last recorded inversion in ``sink`` (latent, sigmas, trajectory, record), or None."""
    if not sink:
        return None
    inv = sink[-1]
    return Inversion(inv.latent.cpu(), inv.sigmas.cpu(), [t.cpu() for t in inv.trajectory], inv.record)


def _invert(guider, settings: InversionSettings, samples: torch.Tensor, grid: torch.Tensor):
    """``(x_T, replay)``: ``samples`` inverted up the flipped ``grid`` by ``guider``; ``replay`` is the recorded
    inversion on the CPU when ``settings.record`` asks for one, else None."""
    sampler, sink = sampler_with_sink(inversion_function, settings)
    x_t = run_sampler(guider, sampler, samples, inversion_sigmas(grid), settings.seed)
    return x_t, _cpu_replay(sink) if settings.record is not None else None


class ZeroConDDIMInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="ZeroConDDIMInversion",
            display_name="ZeroCon DDIM Inversion",
            category=CATEGORY,
            description=(
                "Deterministic DDIM inversion of an image latent (pix2pix-zero): runs the model up the flipped "
                "ddim_uniform sigmas (Flux / SD3: the model's own simple sigmas, the Euler ODE run backwards) with the "
                "caption, optionally regularising the predicted noise. The LATENT output is x_T: for SD1.x/2.x/SDXL a "
                "stock SamplerCustom (add_noise off, the SIGMAS output, cfg 1, the caption) reconstructs the image "
                "from it; for Flux / SD3 use the ZeroCon Guided Sampler (ComfyUI's flow noise scaling would blank a "
                "latent at sigma 1). convention: current = ComfyUI's FlipSigmas + ddim / euler; next = diffusers' "
                "DDIMInverseScheduler (pix2pix-zero's diffusers pipeline; SD models only)."
            ),
            inputs=[
                *_inversion_inputs(),
                *_regularization_inputs(),
                seed_input("Seeds the regulariser's random shifts (the inversion itself is deterministic)."),
                *_inversion_optional_inputs(),
            ],
            outputs=_inversion_outputs(),
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
        convention="current",
        guidance=None,
    ) -> io.NodeOutput:
        check_convention(convention)
        family = detect_family(model)
        named = {"caption": conditioning, "negative": negative}
        samples, warning = checked_latent(model, family, latent, int(steps), named)
        if cfg != 1.0 and negative is None:
            raise ValueError("ZeroCon DDIM Inversion: cfg other than 1 needs a negative conditioning")
        reg = NoiseRegularization(lambda_ac, lambda_kl, int(reg_outer), int(reg_rolls)) if regularize else None
        sampling = ddim_grid(model.get_model_object("model_sampling"), int(steps), convention)
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(conditioning, negative if negative is not None else conditioning)
        guider.set_cfg(cfg)
        terms = tuple(guidance or ())  # as connected: what a term records does not depend on its weight's value
        record = RecordSettings(guidance=terms) if terms else None
        settings = InversionSettings(
            cfg=float(cfg), regularization=reg, seed=int(seed), eval_at=convention, record=record
        )
        x_t, replay = _invert(guider, settings, samples, sampling)
        data = InversionData(
            latent=x_t,
            sigmas=sampling,
            source=conditioning,
            family=family.name,
            prediction_type=family.prediction_type,
            model_key=model_key(guider.model_patcher),
            regularization=reg,
            replay=replay,
            recorded_for=terms,
        )
        shown = ui.PreviewText(warning) if warning else None
        return io.NodeOutput(latent_out(latent, x_t), data, sampling.clone(), ui=shown)


def guided_settings(step_mode, step_size, branches, seed, reference, keep_reference: bool = False) -> SamplerSettings:
    """The engine's sampler settings from the guided samplers' widgets (``guided_step_inputs``, ``reference``)."""
    return SamplerSettings(
        step_mode=step_mode,
        step_size=float(step_size),
        branches=branches,
        seed=int(seed),
        keep_reference=keep_reference,
        reference=reference,
    )


def guided_step_inputs() -> list:
    """The guided samplers' ``step_mode``, ``step_size``, ``branches`` and ``seed``."""
    return [
        *step_inputs(),
        io.Combo.Input("branches", options=list(BRANCHES), default="edit", tooltip=BRANCHES_TOOLTIP),
        seed_input(GUIDED_SEED),
    ]


def reference_input() -> io.Input:
    """The guided samplers' optional ``reference`` (where the reference maps come from)."""
    return io.Combo.Input(
        "reference", options=list(REFERENCES), default="inverted", optional=True, tooltip=REFERENCE_TOOLTIP
    )


def _guided_sampler_inputs() -> list:
    """The Guided Sampler's inputs: model, inversion, edit, cfg, the guided steps, then the optional ones."""
    return [
        io.Model.Input("model", tooltip="The model used for the inversion (LoRAs and patches apply)."),
        INVERSION.Input("inversion", tooltip="The output of ZeroCon DDIM Inversion."),
        io.Conditioning.Input(
            "edited", tooltip="The edited conditioning (e.g. the caption moved by an edit direction)."
        ),
        cfg_input(
            5.0,
            "Classifier-free guidance between the negative (default: the source caption) and the edit "
            "(pix2pix-zero: 5).",
        ),
        *guided_step_inputs(),
        *(
            kind.Input(name, optional=True, tooltip=tip)
            for name, (kind, tip) in {
                "source": (io.Conditioning, "The source caption's conditioning; default: the one the inversion used."),
                "negative": (
                    io.Conditioning,
                    "Negative conditioning for CFG; default: the source caption (pix2pix-zero for real images).",
                ),
                "guidance": (GUIDANCE, "Guidance terms (cross-attention, PatchNCE...); none = plain DDIM edit."),
                "latent": (
                    io.Latent,
                    "Start from this latent instead of the inversion's x_T (same size as the inversion).",
                ),
            }.items()
        ),
        reference_input(),
    ]


def _checked_inversion(model, inversion, cfg: float):
    """The MODEL's family once ``inversion`` is DDIM Inversion's data made with that family (cfg warned about)."""
    if not isinstance(inversion, InversionData):
        raise ValueError("ZeroCon Guided Sampler: 'inversion' must come from ZeroCon DDIM Inversion")
    family = check_family(model, inversion)
    cfg_warning(family, cfg, "ZeroCon Guided Sampler")
    return family


class ZeroConGuidedSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="ZeroConGuidedSampler",
            display_name="ZeroCon Guided Sampler",
            category=CATEGORY,
            description=(
                "pix2pix-zero(Con) editing: from the inverted latent, a reference branch reconstructs the source "
                "while the edit branch samples with the edited conditioning (CFG against the caption by default) and, "
                "at each step, takes one gradient step on its latent so that its attention maps / features stay close "
                "to the reference's (the guidance chain)."
            ),
            inputs=_guided_sampler_inputs(),
            outputs=[
                io.Latent.Output(display_name="edit", tooltip="The edited latent."),
                io.Latent.Output(
                    display_name="reconstruction",
                    tooltip="The reference branch: the source reconstructed from x_T (reference inverted: exactly the "
                    "latent the inversion started from).",
                ),
                *diagnostics_outputs(),
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
        reference="inverted",
    ) -> io.NodeOutput:
        family = _checked_inversion(model, inversion, float(cfg))
        base = latent if latent is not None else {"samples": inversion.latent}
        samples = base["samples"]
        check_inversion_latent(inversion, samples)
        check_latent(samples, family)
        source = inversion.source if source is None else source
        named = {"edited": edited, "source": source, "negative": negative}
        check_conditionings(named, samples.shape[0], family, model)

        guider = ZeroConGuider(model)
        guider.set_zerocon(edited, source, negative, cfg=float(cfg), guidance=guidance, inversion=inversion)
        settings = guided_settings(step_mode, step_size, branches, seed, reference, keep_reference=True)
        sampler, sink = sampler_with_sink(guided_function, settings)
        edit, ref = split_reference(run_sampler(guider, sampler, samples, inversion.sigmas, int(seed)))
        image, text = diagnostics_of(sink)
        return io.NodeOutput(latent_out(base, edit), latent_out(base, ref), image, text, ui=ui.PreviewText(text))


class ZeroConGuiderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
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
                cfg_input(5.0, "Classifier-free guidance scale (pix2pix-zero: 5)."),
                io.Conditioning.Input(
                    "negative", optional=True, tooltip="Negative conditioning; default: the source caption."
                ),
                GUIDANCE.Input("guidance", optional=True, tooltip="Guidance terms; none = plain DDIM edit."),
                INVERSION.Input(
                    "inversion",
                    optional=True,
                    tooltip="The ZeroCon DDIM Inversion output, for the reference 'inverted' (its recorded maps).",
                ),
            ],
            outputs=[io.Guider.Output(display_name="guider", tooltip="Use with the ZeroCon Guided DDIM Sampler.")],
        )

    @classmethod
    def execute(cls, model, edited, source, cfg, negative=None, guidance=None, inversion=None) -> io.NodeOutput:
        cfg_warning(detect_family(model), float(cfg), "ZeroCon Guider")
        if inversion is not None and not isinstance(inversion, InversionData):
            raise ValueError("ZeroCon Guider: 'inversion' must come from ZeroCon DDIM Inversion")
        guider = ZeroConGuider(model)
        guider.set_zerocon(edited, source, negative, cfg=float(cfg), guidance=guidance, inversion=inversion)
        return io.NodeOutput(guider)


class ZeroConGuidedDDIMSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="ZeroConGuidedDDIMSampler",
            display_name="ZeroCon Guided DDIM Sampler",
            category=CATEGORY,
            description=(
                "A SAMPLER for SamplerCustomAdvanced running pix2pix-zero(Con)'s guided DDIM loop. Needs the ZeroCon "
                "Guider; use DisableNoise and the inversion's SIGMAS. A SAMPLER has no outputs of its own: the "
                "guidance summary (steps applied, update size) goes to the console log."
            ),
            inputs=[*guided_step_inputs(), reference_input()],
            outputs=[
                io.Sampler.Output(
                    display_name="sampler", tooltip="Use with the ZeroCon Guider in SamplerCustomAdvanced."
                )
            ],
        )

    @classmethod
    def execute(cls, step_mode, step_size, branches, seed, reference="inverted") -> io.NodeOutput:
        settings = guided_settings(step_mode, step_size, branches, seed, reference)
        return io.NodeOutput(ZeroConKSampler(guided_function, extra_options={"settings": settings}))


NODES = [ZeroConDDIMInversion, ZeroConGuidedSampler, ZeroConGuiderNode, ZeroConGuidedDDIMSampler]
