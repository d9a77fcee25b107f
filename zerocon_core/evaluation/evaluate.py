"""Score a set of edits: ``python -m zerocon_core eval --manifest FILE --out CSV [--clip DIR] [--dino DIR]``,
or PIE-Bench: ``python -m zerocon_core eval --piebench mapping_file.json --edited [NAME=]DIR ... --out CSV``.

Manifest rows (CSV or JSONL: ``source``, ``edited``, ``source_text``, ``target_text``[, ``mask``, ``id``]) or
PIE-Bench entries x methods are scored into a per-image CSV (columns ``COLUMNS`` / ``PIE_COLUMNS``; appended row
by row, so a rerun resumes) and ``<out>_summary.csv`` (per metric: n, mean, std, 95% bootstrap interval).
Formats, units and the resume rules: docs/host-internals.md, "Scoring edits".
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from ..common.legacy_args import merge_settings
from ..common.log import logger
from . import piebench
from .command_line import EXIT_USAGE as EXIT_USAGE  # re-exported: the old names
from .command_line import USER_ERRORS as USER_ERRORS
from .command_line import (
    add_input_choice,
    add_piebench_selection,
    check_metric_folders,
    check_piebench_only,
    load_metric_models,
    log_level,
    log_to_stderr,
    parse_or_exit_code,
    piebench_image_folder,
    report_errors,
)
from .metrics import METRIC_NAMES, edit_metrics

__all__ = [
    "COLUMNS",
    "PIE_COLUMNS",
    "ManifestRow",
    "PieBenchRun",
    "check_piebench_inputs",
    "evaluate_manifest",
    "evaluate_piebench",
    "evaluate_piebench_row",
    "format_piebench_table",
    "load_mask",
    "main",
    "metric_stats",
    "parse_methods",
    "read_manifest",
    "read_records",
    "register",
    "run",
    "summarize",
    "summarize_piebench",
]

COLUMNS = ("id", "source", "edited", "mask", "source_text", "target_text", "status", "message") + METRIC_NAMES
SUMMARY_COLUMNS = ("metric", "n", "n_nonfinite", "mean", "std", "ci95_low", "ci95_high")
REQUIRED = ("source", "edited", "source_text", "target_text")
BOOTSTRAP_SAMPLES = 2000


@dataclass(frozen=True)
class ManifestRow:
    """One edit to score; paths as written in the manifest (``mask`` "" when absent)."""

    id: str
    source: str
    edited: str
    source_text: str
    target_text: str
    mask: str = ""


# ---------------------------------------------------------------------------------------------------------
# Manifest


def _is_jsonl(path: Path, text: str) -> bool:
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return True
    if path.suffix.lower() in (".csv", ".tsv"):
        return False
    return text.lstrip().startswith("{")


def read_records(path: str | os.PathLike, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Rows of a CSV (header) or JSONL file as dicts; ``ValueError`` when a ``required`` field is absent."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    text = path.read_text(encoding="utf-8-sig")
    records: list[dict[str, Any]] = []
    if _is_jsonl(path, text):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {n}: not valid JSON: {exc}") from exc
            if not isinstance(rec, dict):
                raise ValueError(f"{path}, line {n}: expected a JSON object, got {type(rec).__name__}")
            records.append(rec)
    else:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"manifest {path} lacks the column(s) {missing}; it has {reader.fieldnames}")
        records = list(reader)
    for i, rec in enumerate(records):
        missing = [k for k in required if rec.get(k) is None]
        if missing:
            raise ValueError(f"manifest {path}, row {i}: missing field(s) {missing}")
    return records


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    """Read a CSV or JSONL manifest. Raises ``FileNotFoundError`` / ``ValueError`` (missing fields, duplicate ids)."""
    records = read_records(path, REQUIRED)
    rows: list[ManifestRow] = []
    seen: set[str] = set()
    for i, rec in enumerate(records):
        row_id = str(rec.get("id") if rec.get("id") not in (None, "") else i)
        if row_id in seen:
            raise ValueError(f"manifest {path}: duplicate id {row_id!r}")
        seen.add(row_id)
        rows.append(
            ManifestRow(
                id=row_id,
                source=str(rec["source"]),
                edited=str(rec["edited"]),
                source_text=str(rec["source_text"]),
                target_text=str(rec["target_text"]),
                mask=str(rec.get("mask") or ""),
            )
        )
    return rows


def _resolve(base: Path, p: str) -> Path:
    q = Path(os.path.expanduser(p))
    return q if q.is_absolute() else base / q


def load_mask(path: str | os.PathLike) -> torch.Tensor:
    """A mask image -> ``(1, H, W)`` float32 in [0, 1] (greyscale; alpha and colour dropped)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"mask file not found: {p}")
    try:
        with Image.open(p) as im:
            im.load()
            arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot read {p} as an image: {exc}") from exc
    return torch.from_numpy(arr).unsqueeze(0).contiguous()


# ---------------------------------------------------------------------------------------------------------
# Scoring


def _fmt(v: float) -> str:
    return repr(float(v))


def evaluate_row(row: ManifestRow, base: Path, clip: Any = None, dino: Any = None) -> dict[str, str]:
    """Score one manifest row. Never raises for a bad row: the status says what happened."""
    from ..common.images import load_image

    out = {
        "id": row.id,
        "source": row.source,
        "edited": row.edited,
        "mask": row.mask,
        "source_text": row.source_text,
        "target_text": row.target_text,
        "status": "ok",
        "message": "",
    }
    for k in METRIC_NAMES:
        out[k] = "nan"
    paths = {"source": _resolve(base, row.source), "edited": _resolve(base, row.edited)}
    if row.mask:
        paths["mask"] = _resolve(base, row.mask)
    absent = [f"{k} {p}" for k, p in paths.items() if not p.is_file()]
    if absent:
        out["status"], out["message"] = "missing", "file not found: " + "; ".join(absent)
        logger.warning("row %s skipped: %s", row.id, out["message"])
        return out
    try:
        source = load_image(paths["source"])
        edited = load_image(paths["edited"])
        mask = load_mask(paths["mask"]) if "mask" in paths else None
        values = edit_metrics(source, edited, row.source_text, row.target_text, mask=mask, clip=clip, dino=dino)
    except (ValueError, OSError) as exc:  # bad input files; anything else stops the run (resumable)
        out["status"], out["message"] = "error", f"{type(exc).__name__}: {exc}"
        logger.warning("row %s failed: %s", row.id, out["message"])
        return out
    for k in METRIC_NAMES:
        out[k] = _fmt(values[k][0])
    return out


def _read_existing(out: Path, columns: Sequence[str] = COLUMNS, key: Sequence[str] = ("id",)) -> set[Any]:
    """Row keys (the ``key`` fields; the id alone when it is one field) already in ``out``, after checking its
    header is ``columns`` and dropping a torn last line; empty if absent."""
    if not out.is_file() or out.stat().st_size == 0:
        return set()
    text = out.read_text(encoding="utf-8")
    if not text.endswith("\n"):
        cut = text.rfind("\n") + 1
        logger.warning("%s ends with an incomplete row (interrupted write): dropping it", out)
        with open(out, "r+", encoding="utf-8", newline="") as f:
            f.truncate(len(text[:cut].encode("utf-8")))
        text = text[:cut]
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) != tuple(columns):
        raise ValueError(
            f"{out} exists with other columns ({reader.fieldnames}); cannot resume into it: use another --out "
            "or delete the file"
        )
    if len(key) == 1:
        return {r[key[0]] for r in reader}
    return {tuple(r[k] for k in key) for r in reader}


@contextlib.contextmanager
def _appender(
    out: Path, columns: Sequence[str], counts: tuple[int, int], desc: str, progress: bool
) -> Iterator[Callable[[dict[str, str]], None]]:
    """Yields ``write(row)``: appends one CSV row to ``out`` (the header first in a new file), flushed at once,
    and ticks a progress bar of ``counts = (total, already done)``."""
    from tqdm.auto import tqdm

    new_file = not out.is_file() or out.stat().st_size == 0
    total, done = counts
    with (
        open(out, "a", encoding="utf-8", newline="") as f,
        tqdm(total=total, initial=done, desc=desc, unit="img", disable=None if progress else True) as bar,
    ):
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        if new_file:
            writer.writeheader()
            f.flush()

        def write(row: dict[str, str]) -> None:
            writer.writerow(row)
            f.flush()
            bar.update(1)

        yield write


def evaluate_manifest(
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    clip: Any = None,
    dino: Any = None,
    progress: bool = True,
    row_delay: float = 0.0,
) -> list[dict[str, Any]]:
    """Score every manifest row not yet in ``out`` (appending, one flushed row at a time), then write and
    log the summary of the whole output. Returns the summary rows (see ``summarize``)."""
    manifest = Path(manifest)
    out = Path(out)
    rows = read_manifest(manifest)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {out.parent}")
    done = _read_existing(out)
    todo = [r for r in rows if r.id not in done]
    if done:
        logger.info("%s: %d of %d rows already scored, %d to go", out, len(rows) - len(todo), len(rows), len(todo))
    if clip is None:
        logger.info("no CLIP model given: clip_score / clip_accuracy are NaN")
    if dino is None:
        logger.info("no DINO model given: structure_distance is NaN")
    base = manifest.parent
    with _appender(out, COLUMNS, (len(rows), len(rows) - len(todo)), "eval", progress) as write:
        for row in todo:
            write(evaluate_row(row, base, clip, dino))
            if row_delay > 0:
                time.sleep(row_delay)
    summary = summarize(out)
    path = summary_path(out)
    write_summary(summary, path)
    logger.info("summary of %s (also in %s):\n%s", out, path, format_summary(summary))
    return summary


# ---------------------------------------------------------------------------------------------------------
# Summary


def summary_path(out: str | os.PathLike) -> Path:
    """``<out stem>_summary.csv`` next to ``out``."""
    out = Path(out)
    return out.with_name(out.stem + "_summary.csv")


def bootstrap_ci(values: Sequence[float], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean (NaN for fewer than 2 values); deterministic per seed."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(samples, v.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def metric_stats(name: str, rows: Sequence[dict[str, str]]) -> dict[str, Any]:
    """Statistics of column ``name`` over ``rows``: finite values only (NaN skipped, +-inf counted in
    ``n_nonfinite``); keys ``SUMMARY_COLUMNS``."""
    vals = [float(r[name]) for r in rows if r.get(name) not in (None, "")]
    finite = [v for v in vals if math.isfinite(v)]
    nonfinite = sum(1 for v in vals if not math.isfinite(v) and not math.isnan(v))
    n = len(finite)
    mean = sum(finite) / n if n else math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1)) if n > 1 else math.nan
    lo, hi = bootstrap_ci(finite)
    return {"metric": name, "n": n, "n_nonfinite": nonfinite, "mean": mean, "std": std, "ci95_low": lo, "ci95_high": hi}


def summarize(out: str | os.PathLike, metrics: Sequence[str] = METRIC_NAMES) -> list[dict[str, Any]]:
    """Per-metric statistics over the "ok" rows of an output CSV (see the module docstring)."""
    with open(out, encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("status") == "ok"]
    return [metric_stats(name, rows) for name in metrics]


def write_summary(
    summary: list[dict[str, Any]], path: str | os.PathLike, columns: Sequence[str] = SUMMARY_COLUMNS
) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        for s in summary:
            writer.writerow({k: (_fmt(v) if isinstance(v, float) else v) for k, v in s.items()})


def format_summary(summary: list[dict[str, Any]]) -> str:
    """A fixed-width table: metric, n, mean, std, 95% interval."""
    lines = [f"{'metric':<20} {'n':>5} {'mean':>12} {'std':>12} {'95% interval':>27}"]
    for s in summary:
        lines.append(
            f"{s['metric']:<20} {s['n']:>5} {s['mean']:>12.5g} {s['std']:>12.5g} "
            f"[{s['ci95_low']:>11.5g}, {s['ci95_high']:>11.5g}]"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# PIE-Bench

PIE_COLUMNS = ("method", "key", "editing_type_id", "image_path", "edited", "status", "message") + piebench.METRICS
PIE_SUMMARY_COLUMNS = ("method", "n_ok") + SUMMARY_COLUMNS


def parse_methods(specs: Sequence[str]) -> dict[str, Path]:
    """``["NAME=DIR", "DIR", ...]`` -> ``{name: folder}``, in order. Without ``NAME=`` the name is the folder's
    name (its parent's when it is PnPInversion's ``annotation_images``). ``ValueError`` on a repeated name."""
    methods: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or os.sep in name or "/" in name:
            folder = spec
            p = Path(folder).expanduser()
            name = (p.resolve().parent.name if p.name == "annotation_images" else p.name) or folder
        if name in methods:
            raise ValueError(f"--edited: method name {name!r} given twice; name them NAME=DIR")
        methods[name] = Path(folder).expanduser()
    return methods


def evaluate_piebench_row(
    row: piebench.PieBenchRow,
    images: Path,
    method: str,
    folder: Path,
    clip: Any = None,
    dino: Any = None,
    lpips: Any = None,
) -> dict[str, str]:
    """Score one method's edit of one PIE-Bench entry. Never raises for a bad row: the status says what happened."""
    from ..common.images import load_image

    out = {
        "method": method,
        "key": row.key,
        "editing_type_id": row.editing_type_id,
        "image_path": row.image_path,
        "edited": "",
        "status": "ok",
        "message": "",
    }
    out.update(dict.fromkeys(piebench.METRICS, "nan"))
    source_path = images / row.image_path
    edited_path = piebench.find_edited(folder, row)
    absent = [] if source_path.is_file() else [f"source {source_path}"]
    if edited_path is None:
        absent.append("edited " + " or ".join(str(p) for p in piebench.edited_candidates(folder, row)))
    if absent:
        out["status"], out["message"] = "missing", "file not found: " + "; ".join(absent)
        logger.warning("%s %s skipped: %s", method, row.key, out["message"])
        return out
    out["edited"] = str(edited_path)
    try:
        source = load_image(source_path)
        h, w = source.shape[-2:]
        edited = piebench.take_edit_panel(load_image(edited_path), h, w)
        mask = piebench.decode_mask(row.mask, h, w)
        values = piebench.score_pair(source, edited, mask, row.editing_prompt, clip=clip, dino=dino, lpips=lpips)
    except (ValueError, OSError) as exc:  # bad input files; anything else stops the run (resumable)
        out["status"], out["message"] = "error", f"{type(exc).__name__}: {exc}"
        logger.warning("%s %s failed: %s", method, row.key, out["message"])
        return out
    out.update({k: _fmt(v) for k, v in values.items()})
    return out


def check_piebench_inputs(
    mapping: str | os.PathLike,
    methods: dict[str, Path],
    out: str | os.PathLike,
    images: str | os.PathLike | None = None,
    categories: Sequence[str] | None = None,
) -> tuple[list[piebench.PieBenchRow], Path]:
    """Read the annotations and check every folder (``FileNotFoundError`` / ``ValueError``); returns the rows
    and the source image folder (default: ``annotation_images`` next to ``mapping``, PIE-Bench's layout)."""
    mapping = Path(mapping)
    rows = piebench.read_mapping(mapping, categories)
    images = piebench_image_folder(mapping, images)
    for name, folder in methods.items():
        if not folder.is_dir():
            raise FileNotFoundError(f"edited image folder of method {name!r} not found: {folder}")
    if not Path(out).parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {Path(out).parent}")
    return rows, images


@dataclass
class PieBenchRun:
    """Options of ``evaluate_piebench``: the source ``images`` folder (None: ``annotation_images`` next to the
    mapping), the ``categories`` (``editing_type_id`` values) to keep, the metric models (None: their columns are
    NaN) and the progress bar."""

    images: str | os.PathLike | None = None
    categories: Sequence[str] | None = None
    clip: Any = None
    dino: Any = None
    lpips: Any = None
    progress: bool = True


def evaluate_piebench(
    mapping: str | os.PathLike,
    methods: dict[str, Path],
    out: str | os.PathLike,
    *args: Any,
    run: PieBenchRun | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Score every (method, entry) not yet in ``out`` (appending, one flushed row at a time), then write
    ``<out>_summary.csv`` and return its rows (per method and metric, over the entries selected now).
    ``run``: see ``PieBenchRun``; its fields are also accepted as the old keywords / positions after ``out``."""
    opt = merge_settings(PieBenchRun, run, args, kwargs, "evaluate_piebench")
    out = Path(out)
    rows, images = check_piebench_inputs(mapping, methods, out, opt.images, opt.categories)
    done = _read_existing(out, PIE_COLUMNS, ("method", "key"))
    todo = [(m, r) for m in methods for r in rows if (m, r.key) not in done]
    total = len(rows) * len(methods)
    if done:
        logger.info("%s: %d of %d edits already scored, %d to go", out, total - len(todo), total, len(todo))
    for what, model in (("CLIP", opt.clip), ("DINO", opt.dino), ("LPIPS", opt.lpips)):
        if model is None:
            logger.info("no %s model given: its PIE-Bench column(s) are NaN", what)
    with _appender(out, PIE_COLUMNS, (total, total - len(todo)), "pie-bench", opt.progress) as write:
        for method, row in todo:
            write(evaluate_piebench_row(row, images, method, methods[method], opt.clip, opt.dino, opt.lpips))
    summary = summarize_piebench(out, list(methods), [r.key for r in rows])
    write_summary(summary, summary_path(out), PIE_SUMMARY_COLUMNS)
    logger.info("PIE-Bench summary written to %s", summary_path(out))
    return summary


def summarize_piebench(
    out: str | os.PathLike, methods: Sequence[str], keys: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Per method and PIE-Bench metric: ``metric_stats`` over the "ok" rows of ``out`` (only ``keys`` if given)."""
    wanted = None if keys is None else set(keys)
    with open(out, encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("status") == "ok" and (wanted is None or r["key"] in wanted)]
    summary = []
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        summary += [{"method": m, "n_ok": len(mine), **metric_stats(name, mine)} for name in piebench.METRICS]
    return summary


def format_piebench_table(summary: Sequence[dict[str, Any]], digits: int = 2) -> str:
    """PIE-Bench's table as Markdown: one row per method (means over its edits scored "ok", whose number is
    ``n``), columns ``piebench.METRICS`` in PIE-Bench's units; "-" where a metric has no value."""
    methods = list(dict.fromkeys(s["method"] for s in summary))
    head = ["Method", "n"] + [piebench.HEADERS[k] for k in piebench.METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for m in methods:
        by = {s["metric"]: s for s in summary if s["method"] == m}
        cells = [m, str(by["psnr"]["n_ok"])]
        cells += [f"{by[k]['mean']:.{digits}f}" if math.isfinite(by[k]["mean"]) else "-" for k in piebench.METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_input_choice(
        p,
        "CSV or JSONL: source, edited, source_text, target_text[, mask, id]",
        "PIE-Bench's mapping_file.json: score --edited folders and print PIE-Bench's table",
    )
    p.add_argument("--out", required=True, help="per-image metrics CSV (appended to / resumed if it exists)")
    p.add_argument(
        "--clip", default=None, help="local CLIP folder (transformers layout of openai/clip-vit-large-patch14)"
    )
    p.add_argument("--dino", default=None, help="local DINO ViT folder (transformers layout of facebook/dino-vitb8)")
    pie = p.add_argument_group("PIE-Bench (with --piebench)")
    pie.add_argument(
        "--edited",
        nargs="+",
        default=None,
        metavar="[NAME=]DIR",
        help="one folder of edits per method, each edit at its entry's image_path (or that path with .png)",
    )
    add_piebench_selection(pie)
    pie.add_argument(
        "--lpips",
        default=None,
        metavar="DIR",
        help="folder with squeezenet1_1-b8a52dc0.pth and LPIPS' squeeze.pth (LPIPS column; '-' without it)",
    )
    p.add_argument("--device", default="auto", help="auto (default: cuda if available), cpu, cuda, cuda:1")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--row-delay", type=float, default=0.0, help=argparse.SUPPRESS)  # tests: time to kill a run


def register(subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to an argparse subparsers object (``func`` = ``run``); ``parents`` are
    shared option parsers (the CLI's -v/-q)."""
    p = subparsers.add_parser(
        "eval",
        parents=list(parents),
        help="score edits: CLIP score / accuracy, DINO structure distance, background PSNR/SSIM/MSE; PIE-Bench",
        description="Score a manifest of (source, edited, texts[, mask]) rows, or PIE-Bench's mapping_file.json "
        "against folders of edits (--piebench ... --edited ...), into a per-image CSV plus a summary "
        "(resumable: rows already in --out are skipped).",
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def _device(name: str | None) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _check_run_inputs(args: argparse.Namespace) -> dict[str, Path] | None:
    """Check the annotations / manifest and every folder before anything loads; the PIE-Bench methods (or None)."""
    methods = None
    if getattr(args, "piebench", None):
        if not getattr(args, "edited", None):
            raise ValueError("--piebench needs --edited: the folder(s) of edited images to score")
        methods = parse_methods(args.edited)
        check_piebench_inputs(
            args.piebench, methods, args.out, getattr(args, "images", None), getattr(args, "categories", None)
        )
    else:
        check_piebench_only(args, ("edited", "images", "categories", "lpips"))
        read_manifest(args.manifest)
    check_metric_folders(args.clip, args.dino, getattr(args, "lpips", None))
    return methods


def run(args: argparse.Namespace) -> int:
    """The ``eval`` subcommand. Checks the annotations, folders and model folders before loading anything.
    A Namespace built by hand (the library route) may lack the PIE-Bench options."""
    methods = _check_run_inputs(args)
    device = _device(args.device)
    clip, dino, lpips = load_metric_models(args.clip, args.dino, getattr(args, "lpips", None), device)
    if methods is None:
        evaluate_manifest(
            args.manifest, args.out, clip=clip, dino=dino, progress=not args.no_progress, row_delay=args.row_delay
        )
        return 0
    pie = PieBenchRun(
        getattr(args, "images", None),
        getattr(args, "categories", None),
        clip,
        dino,
        lpips,
        progress=not args.no_progress,
    )
    summary = evaluate_piebench(args.piebench, methods, args.out, run=pie)
    sys.stdout.write(format_piebench_table(summary) + "\n")
    sys.stdout.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m zerocon_core.evaluation.evaluate ...``: the ``eval`` subcommand on its own. Returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m zerocon_core.evaluation.evaluate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    add_arguments(parser)
    args = parse_or_exit_code(parser, argv)
    if isinstance(args, int):
        return args
    with log_to_stderr(log_level(quiet=args.quiet)):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return report_errors(lambda: run(args), parser.prog)


if __name__ == "__main__":
    sys.exit(main())
