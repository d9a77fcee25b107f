"""Edit metrics in a workflow: CLIP score / accuracy, DINO structure distance, background PSNR / SSIM / MSE.

The math is ``zerocon_core.evaluation.metrics`` (see its docstring for the exact definitions). The CLIP used for
scoring is a full transformers ``CLIPModel`` (text and vision towers), which ComfyUI's ``clip_vision``
files are not, so it has its own folder: ``ComfyUI/models/clip_metric/<name>/`` in ``save_pretrained``
layout (the files of https://huggingface.co/openai/clip-vit-large-patch14, the backbone PIE-Bench scores
with). ``clip-vit-large-patch14`` is downloaded there on first use when allowed and online.
"""

from __future__ import annotations

import logging
import math

import torch
from comfy_api.latest import io, ui

from ...zerocon_core.evaluation import metrics
from ...zerocon_core.text.prompts import split_prompts
from ..glue import loaders
from ..glue.inputs import CATEGORY, loader_inputs, schema
from ..glue.loaders import DTYPES, ZeroConModel, patcher_for, unwrap
from ..glue.paths import CLIP_METRIC
from .dino_nodes import Dino

logger = logging.getLogger("zerocon")

ClipMetric = io.Custom("ZEROCON_CLIP_METRIC")

DEFAULT_CLIP = "clip-vit-large-patch14"
SOURCE = loaders.ModelSource(
    key=CLIP_METRIC,
    node="ZeroCon CLIP Metric Loader",
    folder=metrics.CLIP_FOLDER,
    known={DEFAULT_CLIP: metrics.CLIP_MODEL_ID, "clip-vit-base-patch16": "openai/clip-vit-base-patch16"},
)
KNOWN_CLIP = SOURCE.known


#: The loader's tooltips by input name.
LOADER_TIPS = {
    "model": f"Folder under models/clip_metric holding a transformers CLIPModel with its tokenizer (and preprocessor_config.json). '{DEFAULT_CLIP}' is {metrics.CLIP_MODEL_ID}; the known names are listed even before they are downloaded.",
    "precision": "Weight precision. fp32 reproduces published CLIP scores; fp16/bf16 halve the memory on a GPU.",
    "device": "Where CLIP runs. auto/gpu: ComfyUI's main device (offloaded when idle); cpu: always the CPU.",
    "allow_download": "If the folder is missing, download a known model (the names listed first) once from Hugging Face; never when HF_HUB_OFFLINE=1.",
}


class ZeroConCLIPMetricLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="ZeroConCLIPMetricLoader",
            display_name="ZeroCon CLIP Metric Loader",
            category=CATEGORY,
            description=(
                "Loads a full CLIP model (text + vision, transformers layout) from ComfyUI/models/clip_metric/<name> "
                f"to score edits with ZeroCon Edit Metrics. '{DEFAULT_CLIP}' ({metrics.CLIP_MODEL_ID}, PIE-Bench's "
                "backbone) is downloaded on first use when allowed and online."
            ),
            inputs=loader_inputs(SOURCE, DEFAULT_CLIP, LOADER_TIPS),
            outputs=[
                ClipMetric.Output(
                    "clip_metric", display_name="clip_metric", tooltip="The loaded CLIP, for ZeroCon Edit Metrics."
                )
            ],
        )

    @classmethod
    def execute(cls, model, precision, device, allow_download) -> io.NodeOutput:
        folder = loaders.resolve_folder(SOURCE, model, allow_download)
        load_device, offload_device = loaders.devices(device)
        clip = metrics.load_clip_metric(folder, device=offload_device, dtype=DTYPES[precision])
        return io.NodeOutput(ZeroConModel(clip, patcher_for(clip.model, load_device, offload_device), model))


def _images(image: torch.Tensor, what: str) -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, C) -> (B, 3, H, W) float32."""
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[-1] < 3:
        raise ValueError(f"ZeroCon Edit Metrics: {what} must be an IMAGE (B, H, W, 3), got {tuple(image.shape)}")
    return image[..., :3].permute(0, 3, 1, 2).float()


def _mean(t: torch.Tensor) -> float:
    """Mean over the batch of the finite values (inf if all are +inf, NaN if none)."""
    t = t.double()
    finite = t[torch.isfinite(t)]
    if finite.numel():
        return float(finite.mean())
    return math.inf if bool((t == math.inf).any()) else math.nan


def summary_text(values: dict[str, torch.Tensor], masked: bool) -> str:
    """A short human-readable report of the per-image metrics (means over the batch)."""
    n = next(iter(values.values())).numel()
    lines = [f"ZeroCon edit metrics ({n} image{'s' if n != 1 else ''})"]
    if torch.isnan(values["clip_score"]).all():
        lines.append("CLIP score / accuracy: n/a (connect a ZeroCon CLIP Metric Loader)")
    else:
        acc = values["clip_accuracy"]
        lines.append(
            f"CLIP score (target text): {_mean(values['clip_score']):.2f}  (source text: {_mean(values['clip_score_source']):.2f})"
        )
        lines.append(f"CLIP accuracy: {100 * _mean(acc):.1f}% ({int(acc.sum())}/{n} closer to the target text)")
    sd = values["structure_distance"]
    if torch.isnan(sd).all():
        lines.append("structure distance: n/a (connect a ZeroCon DINO Loader)")
    else:
        lines.append(f"structure distance: {_mean(sd):.5f} (x1e3: {1e3 * _mean(sd):.2f}; 0 = same structure)")
    where = "background (mask == 0)" if masked else "whole image (no mask)"
    lines.append(
        f"{where}: PSNR {_mean(values['bg_psnr']):.2f} dB, SSIM {_mean(values['bg_ssim']):.4f}, "
        f"MSE {_mean(values['bg_mse']):.6f}"
    )
    return "\n".join(lines)


def _per_image(text: str) -> str | list[str]:
    """A text of several lines is one text per image (as BLIP Caption writes a batch's captions); else one text."""
    lines = split_prompts(text or "")
    return lines if len(lines) > 1 else (text or "")


#: The Edit Metrics node's number outputs, in order (each the batch mean of the metric of that name), with their
#: tooltips.
METRIC_OUTPUTS = {
    "clip_score": "Mean CLIP score of the edited images against the target text: 100 x max(cosine, 0). NaN without clip_metric.",
    "clip_accuracy": "Fraction of edited images closer (CLIP cosine) to the target text than to the source text. NaN without clip_metric.",
    "structure_distance": "Mean MSE between the DINO key self-similarity matrices of source and edit (PIE-Bench reports it x1000). Lower = structure kept. NaN without dino.",
    "bg_psnr": "Mean background PSNR in dB (inf when the background is unchanged).",
    "bg_ssim": "Mean background SSIM (Gaussian window 11, sigma 1.5); 1 = identical.",
    "bg_mse": "Mean background MSE on [0, 1] pixels.",
}


def _edit_metrics_inputs() -> list:
    """Edit Metrics' inputs: the two images, the two texts, then the optional mask, CLIP and DINO."""
    return [
        io.Image.Input(
            "source_image",
            tooltip="The original image(s), values in [0, 1]. One image is compared with every edited image.",
        ),
        io.Image.Input(
            "edited_image",
            tooltip="The edited image(s), same batch size as the source (or the source is a single image). Resized to the source's size if they differ.",
        ),
        io.String.Input(
            "source_text",
            default="",
            tooltip="Text describing the source (e.g. the caption 'a photo of a cat'); several lines: one per image (BLIP Caption's batch captions). CLIP accuracy counts an edit as applied when the edited image is closer to the target text than to this.",
        ),
        io.String.Input(
            "target_text",
            default="",
            tooltip="Text describing the wanted result (e.g. 'a photo of a dog'); several lines: one per image. The CLIP score is the edited image's similarity to this, 100 x cosine.",
        ),
        io.Mask.Input(
            "mask",
            optional=True,
            tooltip="Optional edit mask at the source's size: 1 (non-zero) marks the edited region; PSNR / SSIM / MSE are measured where it is 0. Without it they cover the whole image.",
        ),
        ClipMetric.Input(
            "clip_metric",
            optional=True,
            tooltip="A CLIP from ZeroCon CLIP Metric Loader. Without it the CLIP score and accuracy are NaN.",
        ),
        Dino.Input(
            "dino",
            optional=True,
            tooltip="A DINO ViT from ZeroCon DINO Loader. Without it the structure distance is NaN.",
        ),
    ]


class ZeroConEditMetrics(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="ZeroConEditMetrics",
            display_name="ZeroCon Edit Metrics",
            category=CATEGORY,
            is_output_node=True,
            description=(
                "Scores an edit: CLIP score and CLIP accuracy (is the edit applied), DINO structure distance (is the "
                "layout kept; PIE-Bench's metric) and PSNR / SSIM / MSE of the background (is the rest unchanged). "
                "Batches give the mean over images. An edited image of another size is resized to the source's."
            ),
            inputs=_edit_metrics_inputs(),
            outputs=[
                *(io.Float.Output(name, display_name=name, tooltip=tip) for name, tip in METRIC_OUTPUTS.items()),
                io.String.Output("summary", display_name="summary", tooltip="All metrics as readable text."),
            ],
        )

    @classmethod
    def execute(
        cls, source_image, edited_image, source_text, target_text, mask=None, clip_metric=None, dino=None
    ) -> io.NodeOutput:
        source = _images(source_image, "source_image")
        edited = _images(edited_image, "edited_image")
        clip = unwrap(clip_metric)
        vit = unwrap(dino)
        values = metrics.edit_metrics(
            source, edited, _per_image(source_text), _per_image(target_text), mask=mask, clip=clip, dino=vit
        )
        text = summary_text(values, mask is not None)
        logger.info("%s", text)
        out = [_mean(values[k]) for k in METRIC_OUTPUTS]
        return io.NodeOutput(*out, text, ui=ui.PreviewText(text))


NODES = [ZeroConCLIPMetricLoader, ZeroConEditMetrics]
