"""Structure-vs-edit trade-off sweep over guidance weights (cross-attention x PatchNCE).

For every image the caption, direction, conditionings, VAE latent and DDIM inversion are computed once; the
guided sampler then runs for every ``(xa weight, nce weight)`` of the grid, plus a ``reconstruction`` row (the
no-edit anchor), and each result is scored. Outputs in ``--out-dir``: ``sweep.csv``, ``sweep_summary.csv``,
``sweep.png``, ``images/`` (and ``piebench_table.md`` with ``--piebench``). Manifest fields, PIE-Bench mode and
the file layout: docs/host-internals.md, "The guidance-weight sweep".
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from zerocon_core.common.images import decode_latents, encode_latents, fit_to_multiple, load_image, resize, save_image
from zerocon_core.common.legacy_args import merge_settings
from zerocon_core.common.log import logger
from zerocon_core.diffusers_host.pipeline import EditOptions, default_guidance, sampling_grid
from zerocon_core.evaluation import metrics as zmetrics
from zerocon_core.evaluation import piebench
from zerocon_core.evaluation.command_line import (
    add_input_choice,
    add_piebench_selection,
    check_metric_folders,
    check_piebench_only,
    from_args,
    load_metric_models,
    log_to_stderr,
    piebench_image_folder,
    report_errors,
)
from zerocon_core.evaluation.evaluate import format_piebench_table, load_mask, metric_stats, read_records
from zerocon_core.method.inversion import EVAL_AT, NoiseRegularization, ddim_invert
from zerocon_core.method.sampler import BRANCHES, SamplerSettings, guided_ddim_sample
from zerocon_core.method.schedule import inversion_sigmas, vp_scale

RECON = "reconstruction"


def sweep_columns(names: Sequence[str] = zmetrics.METRIC_NAMES) -> tuple[str, ...]:
    """Columns of ``sweep.csv`` for the metric columns ``names``."""
    return ("id", "setting", "xa_weight", "nce_weight", "image", "seconds") + tuple(names)


def summary_columns(names: Sequence[str] = zmetrics.METRIC_NAMES) -> tuple[str, ...]:
    """Columns of ``sweep_summary.csv`` for the metric columns ``names``."""
    return ("setting", "xa_weight", "nce_weight", "n") + tuple(names)


SWEEP_COLUMNS = sweep_columns()
SUMMARY_COLUMNS = summary_columns()


@dataclass(frozen=True)
class Setting:
    """One grid point; ``name`` is its label in files and on the plot."""

    xa: float
    nce: float

    @property
    def name(self) -> str:
        return f"xa{self.xa:g}_nce{self.nce:g}"


def parse_grid(text: str) -> list[float]:
    """ "0,0.05,0.1" -> [0.0, 0.05, 0.1] (non-negative, duplicates dropped, order kept)."""
    values: list[float] = []
    for part in text.split(","):
        if not part.strip():
            continue
        v = float(part)
        if not v >= 0:
            raise ValueError(f"guidance weights must be >= 0, got {part!r}")
        if v not in values:
            values.append(v)
    if not values:
        raise ValueError(f"empty weight list {text!r}")
    return values


def _fmt(v: Any) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------------------------------------------
# Running


@dataclass
class Inverted:
    """What every setting of one image shares: the DDIM grid, the inversion, the two conditionings, the
    input's (H, W) and the seconds it took."""

    sigmas: torch.Tensor
    inversion: Any
    source_cond: Any
    edit_cond: Any
    input_size: tuple[int, int]
    seconds: float


def invert_once(pipe: Any, image: torch.Tensor, options: EditOptions) -> Inverted:
    """Caption conditionings, edit direction, VAE latent and DDIM inversion of ``image`` (1, 3, H, W)."""
    work, input_size = fit_to_multiple(image, 8)
    work_size = (int(work.shape[-2]), int(work.shape[-1]))
    caption = options.caption
    t0 = time.perf_counter()
    direction = pipe.make_direction(options, caption)
    src_cond, edit_cond = pipe.conditionings(caption, direction, options.strength, work_size, input_size)
    z0 = encode_latents(pipe.vae, work, options.posterior, options.seed).to(pipe.device)
    sigmas = sampling_grid(
        pipe.denoiser,
        options.steps,
        bool(pipe.scheduler_config.get("set_alpha_to_one", False)),
        int(pipe.scheduler_config.get("steps_offset", 1) or 0),
    )
    inv_sigmas = inversion_sigmas(sigmas)
    inv = ddim_invert(
        pipe.denoiser,
        z0.float() / vp_scale(inv_sigmas[0]),
        inv_sigmas,
        src_cond,
        regularization=NoiseRegularization() if options.regularization else None,
        seed=options.seed,
        eval_at=options.eval_at,
        keep_trajectory=False,
    )
    return Inverted(sigmas, inv, src_cond, edit_cond, input_size, time.perf_counter() - t0)


def sample_setting(pipe: Any, inv: Inverted, options: EditOptions, s: Setting, keep_reference: bool) -> Any:
    """The guided sampler's result for setting ``s`` ("raw" step mode) from the shared inversion."""
    guidance = default_guidance(
        pipe.prediction_type,
        s.xa,
        s.nce,
        options.xa_layers,
        options.nce_layers,
        nce_seed=options.seed,
        step_mode="raw",
    )
    settings = SamplerSettings(
        cfg=options.cfg, branches=options.branches, seed=options.seed, keep_reference=keep_reference, step_mode="raw"
    )
    return guided_ddim_sample(
        pipe.denoiser,
        inv.inversion.latent,
        inv.sigmas,
        source_cond=inv.source_cond,
        edit_cond=inv.edit_cond,
        guidance=guidance,
        settings=settings,
    )


def sweep_image(
    pipe: Any,
    image: torch.Tensor,
    options: EditOptions,
    settings: Sequence[Setting],
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Invert ``image`` (1, 3, H, W) once and sample it under every setting.

    Returns ``(images, seconds)`` keyed by setting name plus ``RECON`` (the DDIM reconstruction); images are
    (1, 3, H, W) float32 in [0, 1] at the input's size.
    """
    inv = invert_once(pipe, image, options)
    scale = vp_scale(inv.sigmas[-1])
    images: dict[str, torch.Tensor] = {}
    seconds: dict[str, float] = {}
    for k, s in enumerate(settings):
        t1 = time.perf_counter()
        res = sample_setting(pipe, inv, options, s, keep_reference=(k == 0))
        images[s.name] = resize(decode_latents(pipe.vae, res.latent * scale), inv.input_size)
        seconds[s.name] = time.perf_counter() - t1 + inv.seconds
        if k == 0 and res.reference is not None:
            images[RECON] = resize(decode_latents(pipe.vae, res.reference * scale), inv.input_size)
            seconds[RECON] = inv.seconds
        if progress:
            logger.info("  %s: %.2fs", s.name, seconds[s.name])
    return images, seconds


@dataclass(frozen=True)
class SweepItem:
    """One image to sweep: where it is, its texts, its edit mask (``(H, W)`` > 0 = edited, or None) and the
    stem of its output files (``images/<setting>/<name>.png`` in PIE-Bench mode, else ``images/<id>_<setting>.png``)."""

    id: str
    source: Path
    source_text: str
    target_text: str
    mask: Any = None
    source_word: str | None = None
    target_word: str | None = None
    name: str = ""


def manifest_items(manifest: Path) -> list[SweepItem]:
    """Rows of a CSV/JSONL manifest (see the module docstring) as sweep items."""
    items = []
    for i, rec in enumerate(read_records(manifest, ("source", "source_text", "target_text"))):
        words = rec.get("source_word") and rec.get("target_word")
        items.append(
            SweepItem(
                id=str(rec.get("id") or i),
                source=manifest.parent / str(rec["source"]),
                source_text=str(rec["source_text"]),
                target_text=str(rec["target_text"]),
                mask=load_mask(manifest.parent / str(rec["mask"])) if rec.get("mask") else None,
                source_word=str(rec["source_word"]) if words else None,
                target_word=str(rec["target_word"]) if words else None,
            )
        )
    return items


def piebench_items(
    mapping: Path, images: Path | None = None, categories: Sequence[str] | None = None, limit: int | None = None
) -> list[SweepItem]:
    """PIE-Bench entries as sweep items: the caption is the original prompt, the direction the editing prompt
    minus it (brackets removed); the blended words are not used (see the module docstring). The mask is
    decoded when the image is read (at its size)."""
    images = images if images is not None else mapping.parent / "annotation_images"
    rows = piebench.read_mapping(mapping, categories)[: limit if limit else None]
    return [
        SweepItem(
            id=r.key,
            source=images / r.image_path,
            source_text=r.original_prompt,
            target_text=r.editing_prompt,
            mask=r.mask,
            name=Path(r.image_path).with_suffix("").as_posix(),
        )
        for r in rows
    ]


def _quantize(image: torch.Tensor) -> torch.Tensor:
    """What an 8-bit PNG of ``image`` reads back as (PIE-Bench scores saved files)."""
    return (image.clamp(0, 1) * 255).round() / 255


@dataclass
class SweepConfig:
    """Settings of ``run_sweep`` besides the grid: metric models (None: their columns are NaN), the edit's
    steps / CFG / seed / sentences per word / regulariser / branches / inversion convention, the plot's axes
    (None: structure distance and CLIP score of the mode), the ``items`` to sweep (None: the manifest's) and
    ``pie`` (PIE-Bench items, scored with PIE-Bench's metrics)."""

    clip: Any = None
    dino: Any = None
    lpips: Any = None
    steps: int = 50
    cfg: float = 5.0
    seed: int = 0
    num_sentences: int = 300
    regularization: bool = True
    branches: str = "edit"
    eval_at: str = "current"
    x_metric: str | None = None
    y_metric: str | None = None
    items: Sequence[SweepItem] | None = None
    pie: bool = False

    def metric_names(self) -> tuple[str, ...]:
        """The scored metric columns of this mode."""
        return piebench.METRICS if self.pie else zmetrics.METRIC_NAMES

    def plot_axes(self) -> tuple[str, str]:
        """``(x_metric, y_metric)`` of the plot; ``ValueError`` when one is not scored in this mode."""
        x = self.x_metric or ("structure_distance_x1e3" if self.pie else "structure_distance")
        y = self.y_metric or ("clip_whole" if self.pie else "clip_score")
        for m in (x, y):
            if m not in self.metric_names():
                raise ValueError(f"metric {m!r} is not scored in this mode; choose from {list(self.metric_names())}")
        return x, y


def item_options(item: SweepItem, config: SweepConfig) -> EditOptions:
    """The (validated) edit options of ``item``: a word direction with both words, else the target prompt."""
    words = item.source_word and item.target_word
    options = EditOptions(
        caption=item.source_text,
        source=item.source_word if words else None,
        target=item.target_word if words else None,
        target_prompt=None if words else item.target_text,
        num_sentences=config.num_sentences,
        steps=config.steps,
        cfg=config.cfg,
        seed=config.seed,
        regularization=config.regularization,
        branches=config.branches,
        eval_at=config.eval_at,
    )
    options.validate()
    return options


def score_image(item: SweepItem, source: torch.Tensor, img: torch.Tensor, mask: Any, config: SweepConfig) -> dict:
    """The metric values of one result ``img`` against ``source`` (PIE-Bench's on the 8-bit image with ``pie``)."""
    if config.pie:
        return piebench.score_pair(
            source, _quantize(img), mask, item.target_text, clip=config.clip, dino=config.dino, lpips=config.lpips
        )
    metrics = zmetrics.edit_metrics(
        source, img, item.source_text, item.target_text, mask=mask, clip=config.clip, dino=config.dino
    )
    return {k: float(metrics[k][0]) for k in config.metric_names()}


def prepare_item(item: SweepItem, config: SweepConfig) -> tuple[torch.Tensor, Any, EditOptions]:
    """``(source image, mask, edit options)`` of ``item`` (PIE-Bench's mask decoded at the image's size)."""
    source = load_image(item.source)
    mask = piebench.decode_mask(item.mask, *source.shape[-2:]) if config.pie else item.mask
    return source, mask, item_options(item, config)


def item_rows(
    item: SweepItem, prepared: tuple, pipe: Any, settings: Sequence[Setting], out_dir: Path, config: SweepConfig
):
    """Sweep one prepared item: save each result image and yield its ``sweep.csv`` row."""
    source, mask, options = prepared
    images, seconds = sweep_image(pipe, source, options, settings)
    for name, img in images.items():
        setting = next((s for s in settings if s.name == name), None)
        file = Path("images") / (f"{name}/{item.name}.png" if config.pie else f"{item.id}_{name}.png")
        (out_dir / file).parent.mkdir(parents=True, exist_ok=True)
        save_image(img, out_dir / file)
        vals = score_image(item, source, img, mask, config)
        row = {
            "id": item.id,
            "setting": name,
            "xa_weight": _fmt(setting.xa) if setting else "",
            "nce_weight": _fmt(setting.nce) if setting else "",
            "image": file.as_posix(),
            "seconds": f"{seconds[name]:.3f}",
        }
        row.update({k: _fmt(float(vals[k])) for k in config.metric_names()})
        yield row


def run_sweep(
    pipe: Any,
    manifest: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    xa: Sequence[float],
    nce: Sequence[float],
    *,
    config: SweepConfig | None = None,
    **kwargs: Any,
) -> dict[str, Path]:
    """Run the grid over every manifest row (or ``config.items``), score, and write the CSVs and the plot.
    Returns their paths. ``config``: see ``SweepConfig``; its fields are also accepted as the old keywords."""
    config = merge_settings(SweepConfig, config, (), kwargs, "run_sweep")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    items = config.items if config.items is not None else manifest_items(Path(manifest))
    names = config.metric_names()
    x_metric, y_metric = config.plot_axes()
    settings = [Setting(a, b) for b in nce for a in xa]
    csv_path = out_dir / "sweep.csv"
    rows: list[dict[str, str]] = []
    with open(csv_path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sweep_columns(names), lineterminator="\n")
        writer.writeheader()
        for i, item in enumerate(items):
            if not item.source.is_file():
                logger.warning("row %s skipped: source image not found: %s", item.id, item.source)
                continue
            prepared = prepare_item(item, config)
            logger.info("sweep %s (%d/%d): %d settings", item.id, i + 1, len(items), len(settings))
            for row in item_rows(item, prepared, pipe, settings, out_dir, config):
                writer.writerow(row)
                f.flush()
                rows.append(row)
    paths = {"csv": csv_path, **write_summaries(rows, settings, out_dir, names, (x_metric, y_metric))}
    if config.pie:
        table = piebench_table(rows, settings)
        paths["table"] = out_dir / "piebench_table.md"
        paths["table"].write_text(table + "\n", encoding="utf-8")
        sys.stdout.write(table + "\n")
        sys.stdout.flush()
    logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths


def write_summaries(
    rows: Sequence[dict[str, str]],
    settings: Sequence[Setting],
    out_dir: Path,
    names: Sequence[str],
    axes: tuple[str, str],
) -> dict[str, Path]:
    """Write ``sweep_summary.csv`` and the plot ``sweep.png`` (``axes``: its x and y metrics); their paths."""
    summary = summarize(rows, settings, names)
    summary_path = out_dir / "sweep_summary.csv"
    with open(summary_path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=summary_columns(names), lineterminator="\n")
        writer.writeheader()
        for s in summary:
            writer.writerow({k: _fmt(v) for k, v in s.items()})
    plot_path = out_dir / "sweep.png"
    plot_tradeoff(summary, plot_path, *axes)
    return {"summary": summary_path, "plot": plot_path}


def piebench_table(rows: Sequence[dict[str, str]], settings: Sequence[Setting]) -> str:
    """PIE-Bench's table (``evaluate.format_piebench_table``) with one row per setting, reconstruction first."""
    summary = []
    for name in [RECON] + [s.name for s in settings]:
        mine = [r for r in rows if r["setting"] == name]
        if mine:
            summary += [{"method": name, "n_ok": len(mine), **metric_stats(k, mine)} for k in piebench.METRICS]
    return format_piebench_table(summary)


def summarize(
    rows: Sequence[dict[str, str]], settings: Sequence[Setting], names: Sequence[str] = zmetrics.METRIC_NAMES
) -> list[dict[str, Any]]:
    """Per setting (reconstruction first, then the grid): mean of every metric in ``names`` over images
    (finite values only)."""
    out = []
    order = [(RECON, None)] + [(s.name, s) for s in settings]
    for name, s in order:
        mine = [r for r in rows if r["setting"] == name]
        if not mine:
            continue
        entry: dict[str, Any] = {
            "setting": name,
            "xa_weight": s.xa if s else "",
            "nce_weight": s.nce if s else "",
            "n": len(mine),
        }
        for k in names:
            vals = [float(r[k]) for r in mine if math.isfinite(float(r[k]))]
            entry[k] = sum(vals) / len(vals) if vals else math.nan
        out.append(entry)
    return out


# ---------------------------------------------------------------------------------------------------------
# Plot (PIL only)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start, end = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    ticks = [round(k * step, 12) for k in range(start, end + 1)]
    return ticks


def _tick_label(v: float) -> str:
    return f"{v:.4g}"


LABELS = {
    "structure_distance": "DINO structure distance (lower = structure kept)",
    "clip_score": "CLIP score vs target text (higher = edit applied)",
    "clip_accuracy": "CLIP accuracy",
    "bg_psnr": "background PSNR (dB)",
    "bg_ssim": "background SSIM",
    "bg_mse": "background MSE",
    "structure_distance_x1e3": "PIE-Bench structure distance x1e3 (lower = structure kept)",
    "clip_whole": "PIE-Bench CLIP Whole (higher = edit applied)",
    "clip_edited": "PIE-Bench CLIP Edited (higher = edit applied)",
    "psnr": "PIE-Bench background PSNR (dB)",
    "lpips_x1e3": "PIE-Bench background LPIPS x1e3",
    "mse_x1e4": "PIE-Bench background MSE x1e4",
    "ssim_x1e2": "PIE-Bench background SSIM x1e2",
}
PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]


Box = tuple[int, int, int, int]  # the plot area: x0, y0, x1, y1 in pixels


def _draw_axes(draw: Any, font: Any, good: Sequence[tuple], box: Box) -> Callable[[float, float], tuple]:
    """Ticks, grid lines and tick labels around the finite points ``good``; returns data -> pixel."""
    x0, y0, x1, y1 = box
    xs, ys = [p[1] for p in good], [p[2] for p in good]
    xpad, ypad = 0.05 * (max(xs) - min(xs)), 0.05 * (max(ys) - min(ys))
    xt, yt = _nice_ticks(min(xs) - xpad, max(xs) + xpad), _nice_ticks(min(ys) - ypad, max(ys) + ypad)
    xlo, xhi, ylo, yhi = xt[0], xt[-1], yt[0], yt[-1]

    def px(x: float, y: float) -> tuple[float, float]:
        return (x0 + (x - xlo) / (xhi - xlo) * (x1 - x0), y1 - (y - ylo) / (yhi - ylo) * (y1 - y0))

    for t in xt:
        X, _ = px(t, ylo)
        draw.line([X, y1, X, y1 + 5], fill="black")
        draw.line([X, y0, X, y1], fill=(230, 230, 230))
        lab = _tick_label(t)
        tw = draw.textlength(lab, font=font)
        draw.text((X - tw / 2, y1 + 8), lab, fill="black", font=font)
    for t in yt:
        _, Y = px(xlo, t)
        draw.line([x0 - 5, Y, x0, Y], fill="black")
        draw.line([x0, Y, x1, Y], fill=(230, 230, 230))
        lab = _tick_label(t)
        tw = draw.textlength(lab, font=font)
        draw.text((x0 - 8 - tw, Y - 6), lab, fill="black", font=font)
    draw.rectangle([x0, y0, x1, y1], outline="black")
    return px


def _draw_points(draw: Any, font: Any, good: Sequence[tuple], px: Callable, box: Box, width: int) -> None:
    """One colour per PatchNCE weight, lines along increasing cross-attention weights, labelled points
    (the reconstruction a black square) and the colour legend."""
    x0, y0, x1, y1 = box
    nces = sorted({s["nce_weight"] for s, _, _ in good if s["nce_weight"] != ""})
    colour = {v: PALETTE[i % len(PALETTE)] for i, v in enumerate(nces)}
    for v in nces:
        line = sorted(((s["xa_weight"], x, y) for s, x, y in good if s["nce_weight"] == v), key=lambda t: t[0])
        if len(line) > 1:
            draw.line([px(x, y) for _, x, y in line], fill=colour[v], width=2)
    for s, x, y in good:
        X, Y = px(x, y)
        if s["setting"] == RECON:
            draw.rectangle([X - 5, Y - 5, X + 5, Y + 5], fill="black")
            label = "reconstruction"
        else:
            draw.ellipse([X - 5, Y - 5, X + 5, Y + 5], fill=colour[s["nce_weight"]], outline="black")
            label = f"xa={s['xa_weight']:g} nce={s['nce_weight']:g}"
        tw = draw.textlength(label, font=font)
        draw.text((X + 7 if X + 7 + tw < width - 4 else X - 7 - tw, Y - 12), label, fill="black", font=font)
    ly = y0 + 8
    for v in nces:
        draw.line([x1 - 150, ly + 6, x1 - 130, ly + 6], fill=colour[v], width=3)
        draw.text((x1 - 125, ly), f"nce weight {v:g}", fill="black", font=font)
        ly += 16


def _axis_titles(img: Any, draw: Any, font: Any, box: Box, metrics: tuple[str, str]) -> None:
    """The x title under the plot and the y title rotated along its left side (``LABELS``)."""
    from PIL import Image, ImageDraw

    x0, y0, x1, y1 = box
    xl = LABELS.get(metrics[0], metrics[0])
    draw.text(((x0 + x1 - draw.textlength(xl, font=font)) / 2, y1 + 30), xl, fill="black", font=font)
    yl = LABELS.get(metrics[1], metrics[1])
    tw = int(draw.textlength(yl, font=font)) + 4
    label = Image.new("RGB", (tw, 16), "white")
    ImageDraw.Draw(label).text((2, 1), yl, fill="black", font=font)
    label = label.rotate(90, expand=True)
    img.paste(label, (12, int((y0 + y1 - label.size[1]) / 2)))


def plot_tradeoff(
    summary: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    x_metric: str = "structure_distance",
    y_metric: str = "clip_score",
    size: tuple[int, int] = (900, 640),
) -> Path:
    """Scatter of ``y_metric`` against ``x_metric`` per setting: axes, ticks, labels, one colour per PatchNCE
    weight with lines joining increasing cross-attention weights, every point labelled, the
    reconstruction as a black square. Settings with a non-finite coordinate are listed as "no data"."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = size
    box = (90, 50, w - 30, h - 80)  # margins: left 90, top 50, right 30, bottom 80
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    pts = [(s, float(s[x_metric]), float(s[y_metric])) for s in summary]
    good = [(s, x, y) for s, x, y in pts if math.isfinite(x) and math.isfinite(y)]
    bad = [s["setting"] for s, x, y in pts if not (math.isfinite(x) and math.isfinite(y))]
    draw.text((box[0], 15), f"Trade-off: {y_metric} vs {x_metric} (mean over images)", fill="black", font=font)
    draw.rectangle(list(box), outline="black")
    if good:
        px = _draw_axes(draw, font, good, box)
        _draw_points(draw, font, good, px, box, w)
    else:
        draw.text(
            (box[0] + 20, (box[1] + box[3]) // 2),
            "no data (give --clip and --dino for these metrics)",
            fill="black",
            font=font,
        )
    if bad:
        draw.text((box[0], h - 22), "no data for: " + ", ".join(bad), fill=(160, 0, 0), font=font)
    _axis_titles(img, draw, font, box, (x_metric, y_metric))
    path = Path(path)
    img.save(path)
    return path


# ---------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/sweep.py", description=__doc__.split("\n\n")[0])
    add_input_choice(
        p,
        "CSV/JSONL: source, source_text, target_text[, id, mask, source_word, target_word]",
        "PIE-Bench's mapping_file.json: sweep its entries, score and print PIE-Bench's table per setting",
    )
    p.add_argument("--model", required=True, help="local Stable Diffusion folder (diffusers layout)")
    p.add_argument("--out-dir", required=True, help="folder for sweep.csv, sweep_summary.csv, sweep.png, images/")
    p.add_argument("--xa", default="0,0.05,0.1,0.2", help="cross-attention guidance weights (comma list)")
    p.add_argument("--nce", default="0,0.05,0.1", help="PatchNCE guidance weights (comma list)")
    p.add_argument(
        "--clip", default=None, help="local CLIP folder for the CLIP metrics (openai/clip-vit-large-patch14)"
    )
    p.add_argument("--dino", default=None, help="local DINO folder for the structure distance (facebook/dino-vitb8)")
    pie = p.add_argument_group("PIE-Bench (with --piebench)")
    add_piebench_selection(pie)
    pie.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N entries")
    pie.add_argument(
        "--lpips", default=None, metavar="DIR", help="folder with squeezenet1_1-b8a52dc0.pth and LPIPS' squeeze.pth"
    )
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--num-sentences", type=int, default=300, help="template sentences per word (source_word/target_word rows)"
    )
    p.add_argument("--no-regularization", action="store_true", help="plain DDIM inversion")
    p.add_argument("--branches", default="edit", choices=BRANCHES, help="guided branches (default edit)")
    p.add_argument("--eval-at", default="current", choices=EVAL_AT, help="DDIM inversion convention (default current)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    metric_names = zmetrics.METRIC_NAMES + piebench.METRICS
    p.add_argument("--x-metric", default=None, choices=metric_names, help="plot x (structure_distance; PIE: ..._x1e3)")
    p.add_argument("--y-metric", default=None, choices=metric_names, help="plot y (clip_score; PIE: clip_whole)")
    return p


def check_inputs(args: argparse.Namespace) -> tuple[list[float], list[float], list[SweepItem] | None]:
    """``(xa weights, nce weights, PIE-Bench items or None)`` after checking the options and every folder."""
    xa, nce = parse_grid(args.xa), parse_grid(args.nce)
    check_piebench_only(args, ("images", "categories", "limit", "lpips"))
    items = None
    if args.piebench:
        mapping = Path(args.piebench)
        items = piebench_items(mapping, Path(args.images) if args.images else None, args.categories, args.limit)
        piebench_image_folder(mapping, args.images or None)
    check_metric_folders(args.clip, args.dino, args.lpips)
    return xa, nce, items


def run(args: argparse.Namespace, pipe: Any = None) -> int:
    """Check, load the models (``pipe`` overrides ``--model``) and run the sweep of ``args``."""
    xa, nce, items = check_inputs(args)
    if pipe is None:
        from zerocon_core.diffusers_host.pipeline import ZeroConPipeline

        pipe = ZeroConPipeline.from_folder(args.model, device=args.device, dtype=args.dtype)
    clip, dino, lpips = load_metric_models(args.clip, args.dino, args.lpips, pipe.device)
    config = from_args(
        SweepConfig,
        args,
        clip=clip,
        dino=dino,
        lpips=lpips,
        regularization=not args.no_regularization,
        items=items,
        pie=bool(args.piebench),
    )
    run_sweep(pipe, args.manifest, args.out_dir, xa, nce, config=config)
    return 0


def main(argv: Sequence[str] | None = None, pipe: Any = None) -> int:
    """Run the sweep; ``pipe`` (a ``ZeroConPipeline``) overrides ``--model`` loading (tests)."""
    args = build_parser().parse_args(argv)
    with log_to_stderr(logging.INFO):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return report_errors(lambda: run(args, pipe), "sweep", errors=(FileNotFoundError, ValueError), interrupt=False)


if __name__ == "__main__":
    sys.exit(main())
