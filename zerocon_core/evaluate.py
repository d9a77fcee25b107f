"""Score a set of edits: ``python -m zerocon_core eval --manifest FILE --out CSV [--clip DIR] [--dino DIR]``.

**Manifest**: CSV (with a header) or JSONL (one object per line; chosen by the ``.jsonl``/``.ndjson``
extension, or by a first character ``{``). Fields: ``source``, ``edited`` (image files), ``source_text``,
``target_text``, and optional ``mask`` (an image whose non-zero pixels mark the edited region; the
background is where it is 0) and ``id`` (default: the row number, from 0). Relative paths are relative to
the manifest's folder.

**Output**: one CSV row per manifest row, columns ``COLUMNS`` (the metrics of ``metrics.METRIC_NAMES``; NaN
for CLIP metrics without ``--clip`` and for the structure distance without ``--dino``). Rows are appended
and flushed one at a time, so a run killed halfway loses nothing; a rerun skips every id already in the
output (delete a row to recompute it). A row whose files are missing or unusable is logged, written with
``status`` "missing" / "error" and a ``message``, and the run goes on.

**Summary**: ``<out>_summary.csv`` next to the output (and logged): per metric, over the rows with status
"ok" and a finite value, the count, mean, standard deviation and a 95% percentile-bootstrap interval of
the mean (2000 resamples, seed 0: deterministic). Non-finite values (PSNR of an identical background is
``inf``) are counted in ``n_nonfinite`` and left out of the statistics.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .log import logger
from .metrics import METRIC_NAMES, edit_metrics

__all__ = [
    "COLUMNS",
    "ManifestRow",
    "evaluate_manifest",
    "load_mask",
    "main",
    "read_manifest",
    "read_records",
    "register",
    "run",
    "summarize",
]

COLUMNS = ("id", "source", "edited", "mask", "source_text", "target_text", "status", "message") + METRIC_NAMES
SUMMARY_COLUMNS = ("metric", "n", "n_nonfinite", "mean", "std", "ci95_low", "ci95_high")
REQUIRED = ("source", "edited", "source_text", "target_text")
BOOTSTRAP_SAMPLES = 2000
EXIT_USAGE = 2
USER_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError)


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
    from .images import load_image

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


def _read_existing(out: Path) -> set[str]:
    """Ids already in ``out`` (after checking its header and dropping a torn last line); empty if absent."""
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
    if tuple(reader.fieldnames or ()) != COLUMNS:
        raise ValueError(
            f"{out} exists with other columns ({reader.fieldnames}); cannot resume into it: use another --out "
            "or delete the file"
        )
    return {r["id"] for r in reader}


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
    from tqdm.auto import tqdm

    base = manifest.parent
    new_file = not out.is_file() or out.stat().st_size == 0
    with (
        open(out, "a", encoding="utf-8", newline="") as f,
        tqdm(
            total=len(rows), initial=len(rows) - len(todo), desc="eval", unit="img", disable=None if progress else True
        ) as bar,
    ):
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        if new_file:
            writer.writeheader()
            f.flush()
        for row in todo:
            writer.writerow(evaluate_row(row, base, clip, dino))
            f.flush()
            bar.update(1)
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


def summarize(out: str | os.PathLike, metrics: Sequence[str] = METRIC_NAMES) -> list[dict[str, Any]]:
    """Per-metric statistics over the "ok" rows of an output CSV (see the module docstring)."""
    with open(out, encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("status") == "ok"]
    result = []
    for name in metrics:
        vals = [float(r[name]) for r in rows if r.get(name) not in (None, "")]
        finite = [v for v in vals if math.isfinite(v)]
        nonfinite = sum(1 for v in vals if not math.isfinite(v) and not math.isnan(v))
        n = len(finite)
        mean = sum(finite) / n if n else math.nan
        std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1)) if n > 1 else math.nan
        lo, hi = bootstrap_ci(finite)
        result.append(
            {
                "metric": name,
                "n": n,
                "n_nonfinite": nonfinite,
                "mean": mean,
                "std": std,
                "ci95_low": lo,
                "ci95_high": hi,
            }
        )
    return result


def write_summary(summary: list[dict[str, Any]], path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
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
# Command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--manifest", required=True, help="CSV or JSONL: source, edited, source_text, target_text[, mask, id]"
    )
    p.add_argument("--out", required=True, help="per-image metrics CSV (appended to / resumed if it exists)")
    p.add_argument(
        "--clip", default=None, help="local CLIP folder (transformers layout of openai/clip-vit-large-patch14)"
    )
    p.add_argument("--dino", default=None, help="local DINO ViT folder (transformers layout of facebook/dino-vitb8)")
    p.add_argument("--device", default="auto", help="auto (default: cuda if available), cpu, cuda, cuda:1")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--row-delay", type=float, default=0.0, help=argparse.SUPPRESS)  # tests: time to kill a run


def register(subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to an argparse subparsers object (``func`` = ``run``); ``parents`` are
    shared option parsers (the CLI's -v/-q)."""
    p = subparsers.add_parser(
        "eval",
        parents=list(parents),
        help="score edits: CLIP score / accuracy, DINO structure distance, background PSNR/SSIM/MSE",
        description="Score a manifest of (source, edited, texts[, mask]) rows into a per-image CSV plus a summary "
        "(resumable: rows already in --out are skipped).",
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def _device(name: str | None) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(args: argparse.Namespace) -> int:
    """The ``eval`` subcommand. Checks the manifest and model folders before loading anything."""
    from .dino import check_dino_folder, load_dino
    from .metrics import check_clip_folder, load_clip_metric

    read_manifest(args.manifest)
    if args.clip:
        check_clip_folder(args.clip)
    if args.dino:
        check_dino_folder(args.dino)
    device = _device(args.device)
    clip = load_clip_metric(args.clip, device=device) if args.clip else None
    dino = load_dino(args.dino, device=device) if args.dino else None
    evaluate_manifest(
        args.manifest, args.out, clip=clip, dino=dino, progress=not args.no_progress, row_delay=args.row_delay
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m zerocon_core.evaluate ...``: the ``eval`` subcommand on its own. Returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m zerocon_core.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s zerocon: %(message)s"))
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return run(args)
    except USER_ERRORS as exc:
        sys.stderr.write(f"{parser.prog}: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write(f"{parser.prog}: interrupted\n")
        return 130
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


if __name__ == "__main__":
    sys.exit(main())
