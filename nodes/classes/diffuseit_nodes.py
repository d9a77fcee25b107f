"""DiffuseIT nodes: DINO structure / style guidance terms and a DiffuseIT sampler.

The guidance terms are ``zerocon_core.diffuseit.guidance``'s: they decode the predicted clean latent with the user's
VAE (full VAE or a TAESD loaded as a VAE), run DINO on the pixels and compare with the source image (keys:
structure) or a reference image ([CLS]: style). They travel on a ZEROCON_GUIDANCE link and compose with
the cross-attention / PatchNCE terms (and run in the ZeroCon Guided Sampler too). The DiffuseIT Sampler
forward-noises the encoded source to DiffuseIT's noise level (no inversion), repeats the first step with
re-noising (resampling) and samples with CFG on the target prompt (text-guided DiffuseIT = the prompt
conditions the model; the DINO losses keep the structure).

Gradients: ComfyUI's VAE and DINO weights are inference tensors; each decode / DINO forward runs inside
``weights.autograd_weights`` (zero-copy swap, restored on exit), like the UNet's autograd session.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import comfy.model_management as mm
import comfy.sample
import comfy.samplers
import torch
from comfy_api.latest import io, ui

from ...zerocon_core.diffuseit.guidance import (
    LAMBDA_CLS,
    LAMBDA_CONT,
    LAMBDA_PIXEL,
    LAMBDA_RANGE,
    LAMBDA_SEM,
    LAMBDA_SSIM,
    DinoStructureGuidance,
    DinoStyleGuidance,
    RangeGuidance,
    SemanticDivergenceGuidance,
)
from ...zerocon_core.diffuseit.start import DIFFUSEIT_RESAMPLE, start_index
from ...zerocon_core.method.guidance import chain
from ...zerocon_core.method.sampler import SamplerSettings
from ..families import article, cfg_warning, detect_family
from ..glue.inputs import (
    CATEGORY,
    GUIDANCE,
    cfg_input,
    chain_inputs,
    guidance_output,
    schema,
    seed_input,
    step_inputs,
    steps_input,
)
from ..glue.loaders import ZeroConModel
from ..glue.weights import autograd_weights
from .dino_nodes import Dino
from .guidance_nodes import AUTO as AUTO_WEIGHT
from .guidance_nodes import resolve_weights
from .sampling_nodes import (
    ZeroConGuider,
    checked_latent,
    ddim_grid,
    diagnostics_of,
    diagnostics_outputs,
    guided_function,
    latent_out,
    run_sampler,
    sampler_with_sink,
)

logger = logging.getLogger("zerocon")

AUTO_STRENGTH = -1.0


# -- the decoder and the weights session ------------------------------------------------------------------


class VAEDecoder:
    """The ``decode`` callable of the DiffuseIT terms over a ComfyUI VAE.

    Model latent (what the UNet denoises, ``latent_format.process_in`` applied) -> ``latent_format.process_out``
    -> ``first_stage_model.decode`` (in the VAE's dtype, on its device; a video VAE's one frame for a family whose
    latents carry a frame axis) -> ``(x + 1) / 2`` in float32, *not*
    clamped (the range loss needs the overshoot; ComfyUI's VAE Decode clamps). ``family`` and
    ``latent_format`` are those of the MODEL the guidance node was given.
    """

    def __init__(self, vae: Any, latent_format: Any, family: str):
        self.vae = vae
        self.latent_format = latent_format
        self.family = family

    def __call__(self, latent: torch.Tensor) -> torch.Tensor:
        model = self.vae.first_stage_model
        device, dtype = decode_placement(self.vae)
        z = self.latent_format.process_out(latent).to(device=device, dtype=dtype)
        image = model.decode(z)
        if image.ndim == 5:  # a video VAE (Qwen-Image's Wan 2.1) decodes the one-frame latent to one frame
            image = image[:, :, 0]
        return (image.float() + 1.0) / 2.0

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [self.vae.first_stage_model]


def decode_placement(vae: Any) -> tuple[torch.device, torch.dtype]:
    """Where and in what dtype ComfyUI's own VAE Decode runs: the VAE's device and ``vae_dtype``, not where its
    weights sit (under Dynamic VRAM they stay on the offload device and are streamed per layer)."""
    param = next(vae.first_stage_model.parameters())
    return torch.device(getattr(vae, "device", None) or param.device), getattr(vae, "vae_dtype", None) or param.dtype


def _patchers(decoder: VAEDecoder, dino: Any) -> list:
    out = [decoder.vae.patcher] if getattr(decoder.vae, "patcher", None) is not None else []
    if isinstance(dino, ZeroConModel) and dino.patcher is not None:
        out.append(dino.patcher)
    return out


def _loaded(patcher) -> bool:
    """Whether ComfyUI's memory manager holds the patcher loaded (not where its weights sit: Dynamic VRAM keeps
    them on the offload device while loaded)."""
    return any(m is patcher or getattr(m, "model", None) is patcher.model for m in mm.loaded_models())


def make_session(decoder: VAEDecoder, dino: Any):
    """Context-manager factory for the terms' ``autograd_session``: puts the VAE and DINO on their load
    device if ComfyUI moved them away, and makes their inference-tensor weights usable by autograd."""
    dino_module = dino.model if isinstance(dino, ZeroConModel) else dino
    modules = decoder.modules + ([dino_module] if isinstance(dino_module, torch.nn.Module) else [])
    patchers = _patchers(decoder, dino)

    @contextlib.contextmanager
    def session():
        missing = [p for p in patchers if not _loaded(p)]
        if missing:
            mm.load_models_gpu(missing)
        with autograd_weights(modules):
            yield

    session.patchers = patchers  # read by the DiffuseIT sampler: loaded together with the UNet
    return session


# -- validation --------------------------------------------------------------------------------------------


def _dino_model(dino: Any, node: str):
    if isinstance(dino, ZeroConModel):
        return dino.model
    if isinstance(dino, torch.nn.Module):
        return dino
    raise ValueError(f"{node}: 'dino' must come from ZeroCon DINO Loader, got {type(dino).__name__}")


def check_vae(vae: Any, family, node: str) -> None:
    """A VAE whose latents the MODEL's family can use: same latent channels, and an image VAE (2-D latents), or a
    video VAE (3-D latents) for a family whose image latents carry a frame axis (Qwen-Image: the Wan 2.1 VAE)."""
    if vae is None or getattr(vae, "first_stage_model", None) is None:
        raise ValueError(f"{node}: the VAE has no weights (load a VAE or a checkpoint with one)")
    channels = getattr(vae, "latent_channels", None)
    dim = getattr(vae, "latent_dim", 2)
    adapter = family.adapter
    if dim != (3 if adapter.frame_axis else 2) or channels != family.latent_channels:
        raise ValueError(
            f"{node}: this VAE makes {channels}-channel {'image' if dim == 2 else f'{dim}-D'} latents but the MODEL "
            f"is {family} with {family.latent_channels}-channel image latents {adapter.latent_shape_text()}: use "
            f"the VAE of the MODEL's family (its checkpoint's VAE, or {family.tiny_decoder} for {family.name})"
        )


def _images(image: torch.Tensor, what: str, node: str) -> torch.Tensor:
    """IMAGE (B, H, W, C) -> a normal (non-inference) float32 (B, 3, H, W) copy in [0, 1]."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] not in (3, 4):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{node}: the {what} must be an IMAGE (B, H, W, 3), got {shape}")
    with torch.inference_mode(False):
        return image[..., :3].permute(0, 3, 1, 2).float().clone().contiguous()


def _common(model, vae, dino, node: str) -> dict:
    family = detect_family(model)
    check_vae(vae, family, node)
    dino_model = _dino_model(dino, node)
    decoder = VAEDecoder(vae, model.model.latent_format, family.name)
    return dict(
        decode=decoder,
        dino=dino_model,
        autograd_session=make_session(decoder, dino),
        prediction_type=family.prediction_type,
    )


def _shared_inputs() -> list:
    return [
        io.Model.Input(
            "model",
            tooltip="The diffusion model you sample with (SD1.x, SD2.x, SDXL, SD3/SD3.5 or Flux): its latent format "
            "tells how to decode the latent.",
        ),
        io.Vae.Input(
            "vae",
            tooltip="The VAE that decodes the predicted image at every guided step (with gradients). "
            "The checkpoint's VAE is exact; a TAESD (taesd / taesdxl / taesd3 / taef1 loaded with Load VAE) is much "
            "cheaper and close enough for DINO at 224 px.",
        ),
        Dino.Input("dino", tooltip="DINO ViT from ZeroCon DINO Loader (DiffuseIT: dino-vitb8)."),
    ]


def _weight_input(default: float = AUTO_WEIGHT):
    return io.Float.Input(
        "weight",
        default=default,
        min=-1.0,
        max=1000.0,
        step=0.01,
        round=0.0001,
        tooltip="-1 = auto (no tuning needed). With the sampler's step_mode auto (default) a ratio: how hard this "
        "node's losses pull next to the other terms (auto: structure 1, style 1, semantic divergence and range "
        "0.5). With step_mode raw a global multiplier of the losses (auto: 1 = DiffuseIT's weights applied as its "
        "posterior-variance step; this scale in latent space is our choice, not verified). 0 disables.",
    )


def _lambda_input(name: str, default: float, tooltip: str):
    """One of DiffuseIT's loss weights (its code's default as the widget's)."""
    return io.Float.Input(name, default=default, min=0.0, max=100000.0, step=1.0, tooltip=tooltip)


def _dino_size_input():
    return io.Int.Input(
        "dino_size",
        default=224,
        min=32,
        max=1024,
        step=8,
        tooltip="Short side (px) the decoded image is resized to for DINO (DiffuseIT: 224; larger keeps "
        "finer structure at a higher cost). The long side is capped at 480/224 of it.",
    )


def _term_inputs(image: io.Input, lambdas: list, extra: tuple = ()) -> list:
    """A DINO guidance node's inputs, in order: model, vae, dino, its ``image``, weight, its ``lambdas``,
    dino_size, its ``extra`` ones, then the window and ``previous``."""
    return [*_shared_inputs(), image, _weight_input(), *lambdas, _dino_size_input(), *extra, *chain_inputs()]


# -- nodes ---------------------------------------------------------------------------------------------------


def _diffuseit_schema(**fields) -> io.Schema:
    """``schema`` of a DiffuseIT node: listed under ``CATEGORY``, experimental until its defaults are confirmed on
    real weights."""
    return schema(is_experimental=True, category=CATEGORY, **fields)


class ZeroConDinoStructureGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _diffuseit_schema(
            node_id="ZeroConDinoStructureGuidance",
            display_name="ZeroCon DINO Structure Guidance (DiffuseIT)",
            description=(
                "DiffuseIT's content losses on the decoded prediction: DINO key self-similarity (weight 1000) and a "
                "patch-contrastive loss on DINO keys (200) against the source image, plus the semantic-divergence "
                "push of the first, noisiest steps (100) and the range loss (200). Weights as DiffuseIT's code."
            ),
            inputs=_term_inputs(
                io.Image.Input(
                    "image",
                    tooltip="The source image whose structure is kept (the one you encoded). "
                    "One image for the whole batch, or one per latent.",
                ),
                [
                    _lambda_input(
                        "lambda_ssim", LAMBDA_SSIM, "Weight of the DINO key self-similarity loss (DiffuseIT: 1000)."
                    ),
                    _lambda_input(
                        "lambda_contrastive",
                        LAMBDA_CONT,
                        "Weight of the patch-contrastive loss on DINO keys, tau 0.07 (DiffuseIT: 200).",
                    ),
                    _lambda_input(
                        "lambda_semantic",
                        LAMBDA_SEM,
                        "Weight of the semantic-divergence loss, active while the noise level is above "
                        "DiffuseIT's gate (sigma 3.54; Flux / SD3: the same SNR, t 0.78) (DiffuseIT: 100; 0 disables).",
                    ),
                    _lambda_input(
                        "lambda_range",
                        LAMBDA_RANGE,
                        "Weight of the range loss on decoded pixels outside [0, 1] (DiffuseIT: 200; 0 disables).",
                    ),
                ],
                extra=(
                    io.Boolean.Input(
                        "noise_blend",
                        default=False,
                        tooltip="Evaluate the DINO losses on DiffuseIT's noise-blended estimate instead of the "
                        "clean prediction (its --use_noise_aug_all).",
                    ),
                ),
            ),
            outputs=[guidance_output("these terms")],
        )

    @classmethod
    def execute(
        cls,
        model,
        vae,
        dino,
        image,
        weight,
        lambda_ssim,
        lambda_contrastive,
        lambda_semantic,
        lambda_range,
        dino_size,
        noise_blend,
        start,
        end,
        previous=None,
    ) -> io.NodeOutput:
        node = "ZeroCon DINO Structure Guidance"
        shared = _common(model, vae, dino, node)
        source = _images(image, "image", node)
        window = dict(start=float(start), end=float(end))
        dino_kw = dict(dino_size=int(dino_size), noise_blend=bool(noise_blend), **window)
        weight = float(weight)
        terms = []
        if lambda_ssim > 0 or lambda_contrastive > 0:
            lambdas = dict(lambda_ssim=float(lambda_ssim), lambda_cont=float(lambda_contrastive))
            terms.append(DinoStructureGuidance(weight=weight, source=source, **lambdas, **shared, **dino_kw))
        if lambda_semantic > 0:
            lambdas = dict(lambda_sem=float(lambda_semantic))
            terms.append(SemanticDivergenceGuidance(weight=weight, source=source, **lambdas, **shared, **dino_kw))
        if lambda_range > 0:
            pixels = {k: shared[k] for k in ("decode", "autograd_session", "prediction_type")}
            terms.append(RangeGuidance(weight=weight, lambda_range=float(lambda_range), **pixels, **window))
        return io.NodeOutput(tuple(previous or ()) + tuple(terms))


class ZeroConDinoStyleGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _diffuseit_schema(
            node_id="ZeroConDinoStyleGuidance",
            display_name="ZeroCon DINO Style Guidance (DiffuseIT)",
            description=(
                "DiffuseIT's image-guided style loss: pulls the decoded prediction's DINO [CLS] token toward the "
                "reference image's (weight 2000), plus a weak pixel MSE toward the reference resized to the output "
                "(3000, mostly global colour). A training-free alternative to IP-Adapter-style references."
            ),
            inputs=_term_inputs(
                io.Image.Input(
                    "reference",
                    tooltip="The style/appearance reference image (any size). One image for the "
                    "whole batch, or one per latent.",
                ),
                [
                    _lambda_input(
                        "lambda_cls",
                        LAMBDA_CLS,
                        "Weight of the DINO [CLS] loss toward the reference (DiffuseIT: 2000).",
                    ),
                    _lambda_input(
                        "lambda_pixel",
                        LAMBDA_PIXEL,
                        "Weight of the pixel MSE toward the reference (DiffuseIT: 3000; 0 disables).",
                    ),
                ],
            ),
            outputs=[guidance_output()],
        )

    @classmethod
    def execute(
        cls, model, vae, dino, reference, weight, lambda_cls, lambda_pixel, dino_size, start, end, previous=None
    ) -> io.NodeOutput:
        node = "ZeroCon DINO Style Guidance"
        shared = _common(model, vae, dino, node)
        ref = _images(reference, "reference", node)
        term = DinoStyleGuidance(
            weight=float(weight),
            reference=ref,
            lambda_cls=float(lambda_cls),
            lambda_pixel=float(lambda_pixel),
            dino_size=int(dino_size),
            start=float(start),
            end=float(end),
            **shared,
        )
        return io.NodeOutput(chain(previous, term))


# -- the sampler ------------------------------------------------------------------------------------------------


def check_decoders(terms, model, family) -> None:
    """Every DINO/range term must decode with the latent format of the MODEL being sampled."""
    fmt = type(model.model.latent_format)
    for term in terms:
        dec = getattr(term, "decode", None)
        if isinstance(dec, VAEDecoder) and type(dec.latent_format) is not fmt:
            raise ValueError(
                f"ZeroCon: the {type(term).__name__} was built for {article(dec.family)} {dec.family} MODEL but "
                f"this MODEL is {family}; "
                "give the DINO guidance node the same MODEL as the sampler"
            )


def _extra_models(terms) -> list:
    """The VAE / DINO patchers the terms' sessions use (each once)."""
    out, seen = [], set()
    for term in terms:
        for p in getattr(getattr(term, "autograd_session", None), "patchers", ()):
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


class ZeroConDiffuseITSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _diffuseit_schema(
            node_id="ZeroConDiffuseITSampler",
            display_name="ZeroCon DiffuseIT Sampler",
            description=(
                "DiffuseIT on your model: the encoded source is noised to DiffuseIT's noise level (no inversion), the "
                "first step is repeated with re-noising (resampling), then guided DDIM with CFG on the target prompt. "
                "Connect DINO Structure (and Style) Guidance; text-guided = the positive prompt describes the target."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The model (SD1.x, SD2.x, SDXL, SD3/SD3.5 or Flux); the same as the guidance nodes'.",
                ),
                io.Conditioning.Input(
                    "positive",
                    tooltip="The target prompt (text-guided DiffuseIT), or a description "
                    "of the source for image-guided style transfer.",
                ),
                io.Conditioning.Input("negative", tooltip="The negative prompt (CFG's other side)."),
                io.Latent.Input("latent", tooltip="The source image's latent (VAE Encode)."),
                GUIDANCE.Input("guidance", tooltip="DINO Structure / Style Guidance (and any other ZeroCon terms)."),
                steps_input("DDIM steps of the full schedule; only the last ones (from the start level) are run."),
                cfg_input(5.0, "Classifier-free guidance between negative and positive."),
                io.Float.Input(
                    "strength",
                    default=AUTO_STRENGTH,
                    min=-1.0,
                    max=1.0,
                    step=0.01,
                    tooltip="How much noise the source gets, as a fraction of the steps (like denoise). -1 = "
                    "auto: DiffuseIT's noise level (sigma 6, about 0.85; Flux / SD3: the same SNR, t 0.86). Less keeps "
                    "more of the source.",
                ),
                io.Int.Input(
                    "resample",
                    default=DIFFUSEIT_RESAMPLE,
                    min=1,
                    max=100,
                    tooltip="Times the first step is done, re-noising in between (DiffuseIT: 10; 1 = off).",
                ),
                seed_input("Seeds the start noise and the resampling noise."),
                *step_inputs("DiffuseIT"),
            ],
            outputs=[
                io.Latent.Output(display_name="latent", tooltip="The translated latent (VAE Decode it)."),
                *diagnostics_outputs(),
            ],
        )

    @classmethod
    def execute(
        cls, model, positive, negative, latent, guidance, steps, cfg, strength, resample, seed, step_mode, step_size
    ) -> io.NodeOutput:
        family = detect_family(model)
        cfg_warning(family, float(cfg), "ZeroCon DiffuseIT Sampler")
        named = {"positive": positive, "negative": negative}
        samples, warning = checked_latent(model, family, latent, int(steps), named)
        terms = resolve_weights(guidance, family, step_mode)
        check_decoders(terms, model, family)
        sigmas = _start_sigmas(model, family, int(steps), strength)
        noise = comfy.sample.prepare_noise(samples, int(seed), latent.get("batch_index"))
        guider = _diffuseit_guider(model, positive, negative, float(cfg), terms)
        settings = SamplerSettings(
            resample=int(resample), step_mode=step_mode, step_size=float(step_size), seed=int(seed)
        )
        sampler, sink = sampler_with_sink(guided_function, settings)
        out = run_sampler(guider, sampler, samples, sigmas, int(seed), noise=noise)
        image, text = diagnostics_of(sink)
        shown = ui.PreviewText(f"{warning}\n{text}" if warning else text)
        return io.NodeOutput(latent_out(latent, out), image, text, ui=shown)


def _start_sigmas(model, family, steps: int, strength: float) -> torch.Tensor:
    """The DDIM grid's levels from DiffuseIT's start level down (``strength`` -1: DiffuseIT's noise level, else
    that fraction of the steps; ``ValueError`` outside (0, 1])."""
    if not (strength == AUTO_STRENGTH or 0.0 < strength <= 1.0):
        raise ValueError(f"ZeroCon DiffuseIT Sampler: strength must be -1 (auto) or in (0, 1], got {strength}")
    full = ddim_grid(model.get_model_object("model_sampling"), steps)
    k = start_index(
        full, None if strength == AUTO_STRENGTH else float(strength), prediction_type=family.prediction_type
    )
    return full[k:]


def _diffuseit_guider(model, positive, negative, cfg: float, terms) -> ZeroConGuider:
    """A ``ZeroConGuider`` on a clone of ``model`` that also loads the terms' VAE / DINO: CFG between ``negative``
    (also the reference branch's "source", used by capturing terms) and ``positive``."""
    work = model.clone()
    extra = _extra_models(terms)
    if extra:  # loaded with the UNet, so that decoding inside the loop does not evict it
        work.set_additional_models("zerocon_diffuseit", extra)
    guider = ZeroConGuider(work)
    guider.set_zerocon(positive, negative, None, cfg=cfg, guidance=terms)
    return guider


NODES = [ZeroConDinoStructureGuidance, ZeroConDinoStyleGuidance, ZeroConDiffuseITSampler]
