"""The whole text-guided pix2pix-zeroCon edit on diffusers components (SD1.x, SD2.x, SDXL).

caption (BLIP, or given) -> edit direction (sentence banks / target prompt / sentence files / loaded)
-> text conditionings -> VAE encode -> DDIM inversion (regularised by default) -> guided DDIM sampling
(cross-attention + PatchNCE guidance) -> VAE decode -> image of the input's size.

Model: a single-file checkpoint, a diffusers-layout folder (``unet/ vae/ text_encoder/ tokenizer/ scheduler/``;
SDXL adds ``text_encoder_2/ tokenizer_2/``) or a Hugging Face model id (``sd_models`` finds and loads it). Everything logs through the ``zerocon`` logger;
progress bars are tqdm (they hide themselves when stderr is not a terminal).

Latent conventions: the VAE gives the scaled VP latent ``z0``; the engine works in sigma space
(``x = z / vp_scale(sigma)``). The clean latent is treated as being at the grid's lowest level
``sigma_table[0]`` (diffusers' ``set_alpha_to_one=False``), as pix2pix-zero and diffusers do.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from ..common.images import decode_latents, encode_latents, fit_to_multiple, load_image, resize
from ..common.legacy_args import merge_settings
from ..common.log import logger
from ..method.auto_weights import AUTO, resolve_weights
from ..method.guidance import CrossAttentionGuidance, GuidanceTerm, PatchNCEGuidance
from ..method.inversion import Inversion, NoiseRegularization, check_eval_at, ddim_invert
from ..method.replay import RecordSettings
from ..method.sampler import SampleResult, SamplerSettings, guided_ddim_sample
from ..method.schedule import check_steps, ddim_sigmas, inversion_sigmas, vp_scale
from ..text.direction import (
    EditDirection,
    apply_direction,
    clip_encoder,
    prompt_difference_direction,
    sdxl_clip_encoder,
    sentence_bank_direction,
    template_sentences,
)
from .sd_models import SDParts, check_sd_folder

#: Timing stages, in report order.
STAGES = ("load", "caption", "direction", "encode", "inversion", "sampling", "decode")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


# ---------------------------------------------------------------------------------------------------------
# Options, results, timing


@dataclass
class EditOptions:
    """Settings of one edit. Direction sources, in priority order: ``direction`` (precomputed),
    ``target_prompt`` (target prompt minus the caption), sentence banks (``source_sentences`` /
    ``target_sentences``, each side falling back to ``num_sentences`` template sentences about
    ``source`` / ``target``).

    ``step_mode`` None: "auto" (raw for ``branches`` "pix2pix-zero": ``sampler.default_step_mode``);
    ``step_size`` None: the sampler's default (2 % of the latent's RMS per step in "auto").
    ``xa_weight`` / ``nce_weight`` None: auto (``auto_weights``: in "auto" mode ratio 1 each; in "raw" mode
    0.1 / 0.5 for eps-prediction models, a tenth of that for v-prediction); 0 disables a term. ``caption``
    None: BLIP captions the image (or, with no BLIP, a "a photo of a {source}" fallback with a warning).
    """

    source: str | None = None
    target: str | None = None
    target_prompt: str | None = None
    caption: str | None = None
    source_sentences: Sequence[str] | None = None
    target_sentences: Sequence[str] | None = None
    direction: EditDirection | None = None
    num_sentences: int = 300
    strength: float = 1.0
    steps: int = 50
    cfg: float = 5.0
    seed: int = 0
    xa_weight: float | None = None
    nce_weight: float | None = None
    xa_layers: str = "all"
    nce_layers: str = "up"
    branches: str = "edit"
    step_mode: str | None = None
    step_size: float | None = None
    regularization: bool = True
    eval_at: str = "current"
    posterior: str = "mean"
    strict_size: bool = False
    blip_prefix: str = "a photography of"
    blip_max_tokens: int = 30
    blip_beams: int = 3
    blip_min_tokens: int = 0

    def sampler_settings(self) -> SamplerSettings:
        """The guided sampler's settings for this edit (raises ``ValueError`` for bad ``branches`` /
        ``step_mode`` / ``step_size``)."""
        size = {} if self.step_size is None else {"step_size": float(self.step_size)}
        return SamplerSettings(cfg=self.cfg, branches=self.branches, seed=self.seed, step_mode=self.step_mode, **size)

    def validate(self) -> None:
        """Raise ``ValueError`` for settings that cannot work (before any model runs)."""
        check_steps(self.steps)
        self.sampler_settings()
        if self.cfg < 0:
            raise ValueError(f"cfg must be >= 0, got {self.cfg}")
        if self.num_sentences < 1:
            raise ValueError(f"num_sentences must be >= 1, got {self.num_sentences}")
        check_eval_at(self.eval_at, "eval_at (the inversion convention)")
        for name in ("xa_weight", "nce_weight"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        if self.direction is None and self.target_prompt is None:
            if self.source_sentences is None and not self.source:
                raise ValueError("no edit direction: give a source word (or source sentences), or a target prompt")
            if self.target_sentences is None and not self.target:
                raise ValueError("no edit direction: give a target word (or target sentences), or a target prompt")


class Timings(dict):
    """Seconds per stage (insertion-ordered); ``stage(name)`` adds the wall time of a block to ``name``."""

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        super().__init__()
        self._sync = sync

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync is not None:
                self._sync()
            self[name] = self.get(name, 0.0) + (time.perf_counter() - start)

    @property
    def total(self) -> float:
        return float(sum(self.values()))

    def table(self) -> str:
        """A fixed-width "where the time went" table (stage, seconds, share of the total)."""
        total = self.total or 1.0
        rows = [f"{'stage':<10} {'seconds':>9} {'share':>6}"]
        for name, sec in self.items():
            rows.append(f"{name:<10} {sec:>9.2f} {100.0 * sec / total:>5.1f}%")
        rows.append(f"{'total':<10} {self.total:>9.2f} {100.0:>5.1f}%")
        return "\n".join(rows)


@dataclass
class EditResult:
    """``image``: (1, 3, H, W) float32 in [0, 1] at the input's size. ``work_size``: the (H, W) the model ran at
    (multiples of 8). ``sample``: the guided sampler's result (latents in sigma space, per-step losses)."""

    image: Tensor
    caption: str
    direction: EditDirection
    timings: Timings
    input_size: tuple[int, int]
    work_size: tuple[int, int]
    sample: SampleResult | None = None
    inversion: Inversion | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# The core: invert + guided sampling on ready conditionings (also used by bench/)


def default_guidance(
    prediction_type: str,
    xa_weight: float | None = None,
    nce_weight: float | None = None,
    xa_layers: str = "all",
    nce_layers: str = "up",
    nce_seed: int = 0,
    *,
    step_mode: str,
) -> tuple[GuidanceTerm, ...]:
    """Cross-attention + PatchNCE terms for the sampler's ``step_mode``; a weight of None is auto
    (``auto_weights.resolve_weights``: ratios 1 / 1 in "auto"; steps 0.1 / 0.5 on eps-prediction models,
    0.01 / 0.05 on v-prediction in "raw" / "normalized"); weight 0 drops a term. ``nce_seed``: PatchNCE's
    sample locations (``PatchNCEGuidance.seed``)."""
    terms = (
        CrossAttentionGuidance(weight=AUTO if xa_weight is None else float(xa_weight), layers=xa_layers),
        PatchNCEGuidance(
            weight=AUTO if nce_weight is None else float(nce_weight), layers=nce_layers, seed=int(nce_seed)
        ),
    )
    return tuple(t for t in resolve_weights(terms, prediction_type, step_mode=step_mode) if t.weight > 0)


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    # disable=None: tqdm hides itself when stderr is not a terminal
    return tqdm(total=total, desc=desc, unit="step", leave=False, disable=None if progress else True)


def sampling_grid(denoiser: Any, steps: int, set_alpha_to_one: bool = False, steps_offset: int = 1) -> Tensor:
    """Descending DDIM sigma grid (``steps + 1`` levels) for ``denoiser``'s schedule, as diffusers' DDIMScheduler."""
    return ddim_sigmas(
        denoiser.sigma_table, steps, final="zero" if set_alpha_to_one else "alpha0", steps_offset=steps_offset
    )


@dataclass
class EditRun:
    """Everything of an ``invert_and_edit`` run besides the sampler's settings: ``steps`` DDIM steps on the
    model's grid (``set_alpha_to_one`` / ``steps_offset`` as in its scheduler config), the inversion's
    ``regularization`` (None: plain DDIM) and ``eval_at`` convention (``ddim_invert``), ``timings`` to add the
    "inversion" / "sampling" stages to, tqdm bars with ``progress``, ``step_callback(phase, i, n)`` after
    every step."""

    steps: int = 50
    regularization: NoiseRegularization | None = NoiseRegularization()
    eval_at: str = "current"
    set_alpha_to_one: bool = False
    steps_offset: int = 1
    timings: Timings | None = None
    progress: bool = True
    step_callback: Callable[[str, int, int], None] | None = None


@contextlib.contextmanager
def _phase(run: EditRun, timings: Timings, phase: str) -> Iterator[Callable[..., None]]:
    """Time ``phase`` into ``timings`` under a progress bar; yields the per-step callback ``(i, n, *_)``."""
    with timings.stage(phase), _bar(run.steps, phase, run.progress) as bar:

        def tick(i: int, n: int, *_: Tensor) -> None:
            bar.update(1)
            if run.step_callback is not None:
                run.step_callback(phase, i, n)

        yield tick


def invert_and_edit(
    denoiser: Any,
    z0: Tensor,
    source_cond: Any,
    edit_cond: Any,
    *,
    guidance: Sequence[GuidanceTerm] = (),
    settings: SamplerSettings = SamplerSettings(),
    run: EditRun | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Inversion, SampleResult]:
    """DDIM-invert the scaled VP latent ``z0`` (B, C, h, w) under ``source_cond`` (no CFG), then run the guided
    sampler with the caption as negative (pix2pix-zero, real images). Returns ``(z, inversion, sample)`` with
    ``z`` the edited scaled VP latent, ready for the VAE (not checked for NaN/Inf here).
    ``settings``: the sampler's (CFG, branches...); its ``seed`` also seeds the inversion's regulariser.
    ``run``: steps, inversion convention, timings, progress (``EditRun``; its fields are also accepted as the
    old keywords ``steps=...``). With ``settings.reference`` "inverted" the inversion records the guidance's
    reference captures and the sampler replays them (``replay``; "resampled" where that is not exact).
    """
    run = merge_settings(EditRun, run, (), kwargs, "invert_and_edit")
    timings = run.timings if run.timings is not None else Timings()
    sigmas = sampling_grid(denoiser, run.steps, run.set_alpha_to_one, run.steps_offset)
    inv_sigmas = inversion_sigmas(sigmas)
    x = z0.float() / vp_scale(inv_sigmas[0])
    record = RecordSettings(guidance=tuple(guidance)) if settings.reference == "inverted" else None
    with _phase(run, timings, "inversion") as tick:
        inv = ddim_invert(
            denoiser,
            x,
            inv_sigmas,
            source_cond,
            regularization=run.regularization,
            seed=settings.seed,
            eval_at=run.eval_at,
            keep_trajectory=False,
            record=record,
            callback=tick,
        )
    with _phase(run, timings, "sampling") as tick:
        res = guided_ddim_sample(
            denoiser,
            inv.latent,
            sigmas,
            source_cond=source_cond,
            edit_cond=edit_cond,
            guidance=guidance,
            settings=settings,
            callback=tick,
            inversion=inv,
        )
    return res.latent * vp_scale(sigmas[-1]), inv, res


# ---------------------------------------------------------------------------------------------------------
# Loading


def resolve_device(device: str | None) -> torch.device:
    """ "auto"/None -> cuda if available, else mps, else cpu; otherwise ``torch.device(device)``."""
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """ "auto"/None -> float16 on GPUs, float32 on the CPU; or a name from ``DTYPES``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        return torch.float32 if device.type == "cpu" else torch.float16
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(sorted(set(DTYPES)))}") from None


_REQUIRED_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler_config")


def _model_parts(parts: Sequence[Any], named: dict[str, Any]) -> SDParts:
    """``ZeroConPipeline``'s components as ``SDParts``: one ``SDParts`` as it is, else the old call's
    positional / named components (``TypeError`` for a missing, unknown or repeated one)."""
    if len(parts) == 1 and isinstance(parts[0], SDParts) and not named:
        return parts[0]
    empty = SDParts(*(None,) * len(_REQUIRED_PARTS))
    p = merge_settings(SDParts, empty, parts, named, "ZeroConPipeline")
    missing = [k for k in _REQUIRED_PARTS if getattr(p, k) is None]
    if missing:
        raise TypeError(f"ZeroConPipeline() missing required argument(s): {', '.join(map(repr, missing))}")
    return p


def options_guidance(prediction_type: str, options: EditOptions, settings: SamplerSettings) -> tuple[GuidanceTerm, ...]:
    """``default_guidance`` with the weights, layers and seed of ``options``, for ``settings.step_mode``."""
    return default_guidance(
        prediction_type,
        options.xa_weight,
        options.nce_weight,
        options.xa_layers,
        options.nce_layers,
        nce_seed=options.seed,
        step_mode=settings.step_mode,
    )


class ZeroConPipeline:
    """The text-guided edit over diffusers components (SD1.x, SD2.x incl. v-prediction, SDXL).

    Build with :meth:`from_model` (or pass components). ``scheduler_config``: the model's scheduler config
    mapping (schedule, prediction type, ``steps_offset``, ``set_alpha_to_one``). ``blip``: an optional
    ``captioning.Blip``. ``close()`` restores the UNet's attention processors.
    """

    def __init__(self, *parts: Any, blip: Any = None, device: torch.device | str = "cpu", **named: Any) -> None:
        """``parts``: one ``sd_models.SDParts``, or the old positional ``unet, vae, text_encoder, tokenizer,
        scheduler_config`` (also accepted by name, with ``text_encoder_2`` / ``tokenizer_2`` for SDXL)."""
        from .denoiser import DiffusersDenoiser

        p = _model_parts(parts, named)
        self.device = torch.device(device)
        self.unet, self.vae = p.unet, p.vae
        self.text_encoder, self.tokenizer = p.text_encoder, p.tokenizer
        self.text_encoder_2, self.tokenizer_2 = p.text_encoder_2, p.tokenizer_2
        self.blip = blip
        self.scheduler_config = dict(p.scheduler_config)
        self.is_sdxl = p.text_encoder_2 is not None
        for m in (p.unet, p.vae, p.text_encoder, p.text_encoder_2):
            if m is not None:
                m.eval().requires_grad_(False)
        self.denoiser = DiffusersDenoiser(p.unet, scheduler_config=self.scheduler_config)
        if self.is_sdxl:
            self.encode = sdxl_clip_encoder(
                p.tokenizer, p.text_encoder, p.tokenizer_2, p.text_encoder_2, device=self.device
            )
        else:
            self.encode = clip_encoder(p.tokenizer, p.text_encoder, device=self.device)

    @property
    def prediction_type(self) -> str:
        return self.denoiser.prediction_type

    @classmethod
    def from_model(
        cls,
        model: str | os.PathLike | None = None,
        device: str | torch.device | None = "cpu",
        dtype: str | torch.dtype | None = None,
        blip_folder: str | os.PathLike | None = None,
        model_config: str | os.PathLike | None = None,
    ) -> ZeroConPipeline:
        """Load ``model``: a single-file checkpoint, a diffusers-layout folder or a Hugging Face model id (None:
        the default model); see ``sd_models``. ``model_config``: a diffusers-layout folder with the configs of a
        checkpoint. Paths are checked (``FileNotFoundError`` / ``ValueError`` naming them) before anything loads."""
        from .sd_models import load_model, model_source

        source = model_source(model)
        if blip_folder is not None:
            from ..text.captioning import check_blip_folder

            check_blip_folder(blip_folder)
        dev = resolve_device(device if not isinstance(device, torch.device) else str(device))
        dt = resolve_dtype(dtype, dev)
        if dev.type == "cpu" and dt == torch.float16:
            logger.warning("float16 on the CPU is slow and some ops are unsupported; float32 is recommended")
        parts = load_model(source, dt, model_config)
        for m in (parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2):
            if m is not None:
                m.to(dev)
        blip = None
        if blip_folder is not None:
            from ..text.captioning import load_blip

            blip = load_blip(blip_folder, device=dev, dtype=torch.float32 if dev.type == "cpu" else dt)
        pipe = cls(parts, blip=blip, device=dev)
        logger.info(
            "loaded %s model from %s (%s, %s, %s-prediction)",
            parts.family,
            source,
            dev,
            str(dt).replace("torch.", ""),
            pipe.prediction_type,
        )
        return pipe

    @classmethod
    def from_folder(
        cls,
        folder: str | os.PathLike,
        device: str | torch.device | None = "cpu",
        dtype: str | torch.dtype | None = None,
        blip_folder: str | os.PathLike | None = None,
    ) -> ZeroConPipeline:
        """Load every part from a local diffusers-layout folder (``local_files_only``). Raises
        ``FileNotFoundError`` naming the folder or the missing sub-folders before loading anything."""
        check_sd_folder(folder)
        return cls.from_model(folder, device=device, dtype=dtype, blip_folder=blip_folder)

    def close(self) -> None:
        """Give the UNet its original attention processors back."""
        self.denoiser.close()

    # -- steps --------------------------------------------------------------------------------------------------

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def caption_image(self, image: Tensor, options: EditOptions) -> str:
        """The source prompt: ``options.caption``, else BLIP's caption, else "a photo of a {source}" (warned)."""
        if options.caption is not None:
            text = " ".join(options.caption.split())
            if not text:
                raise ValueError("the caption is empty: give a non-empty --caption or use BLIP")
            return text
        if self.blip is not None:
            from ..text.captioning import caption

            return caption(
                self.blip,
                image.permute(0, 2, 3, 1),
                prefix=options.blip_prefix,
                max_new_tokens=options.blip_max_tokens,
                num_beams=options.blip_beams,
                min_new_tokens=options.blip_min_tokens,
            )[0]
        word = options.source or "thing"
        text = f"a photo of a {word}"
        logger.warning("no caption and no BLIP model: using %r as the source prompt (give --caption or --blip)", text)
        return text

    def make_direction(self, options: EditOptions, caption: str) -> EditDirection:
        """The edit direction for ``options`` (see ``EditOptions``); ``caption`` is the prompt-difference source."""
        if options.direction is not None:
            return options.direction
        if options.target_prompt is not None:
            return prompt_difference_direction(self.encode, caption, options.target_prompt)
        src = (
            list(options.source_sentences)
            if options.source_sentences is not None
            else template_sentences(options.source, options.num_sentences, seed=options.seed)
        )
        tgt = (
            list(options.target_sentences)
            if options.target_sentences is not None
            else template_sentences(options.target, options.num_sentences, seed=options.seed + 1)
        )
        return sentence_bank_direction(self.encode, src, tgt, source=options.source or "", target=options.target or "")

    def conditionings(
        self, caption: str, direction: EditDirection, strength: float, size: tuple[int, int], orig_size: tuple[int, int]
    ):
        """``(source_cond, edit_cond)`` TextConds: the caption, and the caption moved along ``direction``."""
        from .denoiser import TextCond

        embeds, pooled = self.encode([caption])
        if not self.is_sdxl:
            return TextCond(embeds), TextCond(apply_direction(embeds, direction, strength))
        (h, w), (oh, ow) = size, orig_size
        time_ids = torch.tensor([[oh, ow, 0, 0, h, w]], dtype=torch.float32)
        edit_embeds, edit_pooled = apply_direction(embeds, direction, strength, pooled)
        return (
            TextCond(embeds, {"text_embeds": pooled, "time_ids": time_ids}),
            TextCond(edit_embeds, {"text_embeds": edit_pooled, "time_ids": time_ids}),
        )

    def guidance_terms(self, options: EditOptions, settings: SamplerSettings) -> tuple[GuidanceTerm, ...]:
        """The guidance terms of ``options`` for ``settings.step_mode`` (``options_guidance``), logged."""
        guidance = options_guidance(self.prediction_type, options, settings)
        logger.info(
            "guidance (step mode %s): %s",
            settings.step_mode,
            ", ".join(f"{type(t).__name__}(weight={t.weight:g})" for t in guidance) or "none",
        )
        return guidance

    def edit_run(self, options: EditOptions, timings: Timings, progress: bool) -> EditRun:
        """``invert_and_edit``'s run settings for ``options`` on this model's scheduler grid."""
        return EditRun(
            steps=options.steps,
            regularization=NoiseRegularization() if options.regularization else None,
            eval_at=options.eval_at,
            set_alpha_to_one=bool(self.scheduler_config.get("set_alpha_to_one", False)),
            steps_offset=int(self.scheduler_config.get("steps_offset", 1) or 0),
            timings=timings,
            progress=progress,
        )

    def edit(
        self,
        image: Tensor | str | os.PathLike,
        options: EditOptions,
        *,
        progress: bool = True,
        timings: Timings | None = None,
    ) -> EditResult:
        """Run the whole edit on ``image`` (a path, or (1, 3, H, W) in [0, 1]); see the module docstring."""
        options.validate()
        timings = timings if timings is not None else Timings(self._sync)
        timings._sync = self._sync
        img, work, input_size = _edit_input(image, options.strict_size)
        work_size = (int(work.shape[-2]), int(work.shape[-1]))

        with timings.stage("caption"):
            caption = self.caption_image(img, options)
        logger.info("caption: %s", caption)
        with timings.stage("direction"):
            direction = self.make_direction(options, caption)
        with timings.stage("encode"):
            src_cond, edit_cond = self.conditionings(caption, direction, options.strength, work_size, input_size)
            z0 = encode_latents(self.vae, work, options.posterior, options.seed)

        settings = options.sampler_settings()
        z, inv, res = invert_and_edit(
            self.denoiser,
            z0.to(self.device),
            src_cond,
            edit_cond,
            guidance=self.guidance_terms(options, settings),
            settings=settings,
            run=self.edit_run(options, timings, progress),
        )
        if not torch.isfinite(z).all():
            raise FloatingPointError("guided sampling produced NaN/Inf (try a lower --xa-weight / --nce-weight)")
        with timings.stage("decode"):
            out = decode_latents(self.vae, z)
            out = resize(out, input_size)
        if not torch.isfinite(out).all():
            raise FloatingPointError("the decoded image contains NaN/Inf")
        logger.info("timings (s): %s", ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
        return EditResult(out, caption, direction, timings, input_size, work_size, sample=res, inversion=inv)


def _edit_input(image: Tensor | str | os.PathLike, strict_size: bool) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """``(image, work, input_size)``: the (1, 3, H, W) float image, its copy at multiples of 8 and (H, W)."""
    img = load_image(image) if isinstance(image, (str, os.PathLike)) else image.float()
    if img.ndim != 4 or img.shape[0] != 1 or img.shape[1] != 3:
        raise ValueError(f"edit takes one RGB image (1, 3, H, W), got {tuple(img.shape)}")
    work, input_size = fit_to_multiple(img, 8, strict=strict_size)
    return img, work, input_size
