"""The toy-world quality table: edit rate, object IoU and background PSNR of every method on the held-out
edit set, read by the checker; the sweep of the auto step size and the PatchNCE ratio; the sample quality of
the trained model. See docs/toyworld.md.

    .venv/bin/python bench/toyworld_quality.py table --edits 120 --steps 20
    .venv/bin/python bench/toyworld_quality.py sweep --edits 48 --steps 20
    .venv/bin/python bench/toyworld_quality.py samples
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from zerocon_core.toyworld import edits  # noqa: E402
from zerocon_core.toyworld.methods import METHODS, RunSettings, run_batch  # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "tests" / "data" / "toyworld" / "model"
#: Edits per batch (results equal single edits to ~1e-6: one inversion and sampler, per-image auto steps).
BATCH = 40
SWEEP_STEPS = (0.005, 0.01, 0.02, 0.04)
SWEEP_RATIOS = (0.5, 1.0, 2.0)


def load(model: Path):
    from zerocon_core.diffusers_host.pipeline import ZeroConPipeline

    return ZeroConPipeline.from_folder(model, device="cpu", dtype="float32")


def evaluate(pipe, cases, method: str, run: RunSettings) -> dict:
    """Scores of ``method`` on ``cases``: the summary, per kind, and the seconds per edit."""
    rows, start = [], time.time()
    for i in range(0, len(cases), BATCH):
        chunk = cases[i : i + BATCH]
        for case, image in zip(chunk, run_batch(pipe, chunk, method, run)):
            rows.append({**edits.score(case, image), "kind": case.kind})
    per_edit = (time.time() - start) / max(len(cases), 1)
    kinds = {k: edits.summarize([r for r in rows if r["kind"] == k]) for k in edits.KINDS}
    return {"all": edits.summarize(rows), "kinds": kinds, "seconds_per_edit": per_edit}


def _row(label: str, res: dict) -> str:
    a, k = res["all"], res["kinds"]
    rates = " | ".join(f"{k[x]['success']:.2f}" for x in edits.KINDS)
    return (
        f"| {label} | {a['success']:.2f} | {rates} | {a['kept']:.2f} | {a['iou']:.3f} | {a['bg_psnr']:.2f} "
        f"| {res['seconds_per_edit']:.2f} |"
    )


HEADER = (
    "| method | edit rate | colour | shape | background | rest kept | object IoU | background PSNR (dB) | s / edit |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def _save(args, res: dict) -> None:
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"args": meta, "results": res}, indent=1))


def _run(args, configs: list[tuple[str, str, dict]]) -> dict:
    """Every ``(label, method, options)`` on the first ``args.edits`` held-out edits; the table on stdout."""
    pipe = load(args.model)
    cases = edits.edit_set(args.edits)
    out = {}
    for label, method, options in configs:
        run = RunSettings(steps=args.steps, cfg=args.cfg, options=options)
        out[label] = evaluate(pipe, cases, method, run)
        logging.getLogger("zerocon").info("%s", _row(label, out[label]))
        _save(args, out)
    sys.stdout.write(HEADER + "\n" + "\n".join(_row(m, r) for m, r in out.items()) + "\n")
    return out


def table(args) -> dict:
    return _run(args, [(m, m, {}) for m in args.methods])


def sweep(args) -> dict:
    """Per auto step size: cross-attention alone, cross-attention + PatchNCE at each ratio, PatchNCE alone."""
    configs = []
    for size in args.step_sizes:
        configs.append((f"step {size:g}: cross-attention only", "default", {"step_size": size, "nce_weight": 0.0}))
        for ratio in args.ratios:
            label = f"step {size:g}: cross-attention + PatchNCE ratio {ratio:g}"
            configs.append((label, "default", {"step_size": size, "nce_weight": ratio}))
        configs.append((f"step {size:g}: PatchNCE only", "default", {"step_size": size, "xa_weight": 0.0}))
    return _run(args, configs)


def samples(args) -> dict:
    from zerocon_core.diffusers_host.sd_models import load_folder
    from zerocon_core.toyworld.sampling import SampleSettings, sample_quality

    start = time.time()
    res = sample_quality(load_folder(args.model), SampleSettings(per_caption=args.per_caption))
    res["seconds"] = time.time() - start
    sys.stdout.write(json.dumps(res) + "\n")
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("table", "sweep", "samples"))
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--edits", type=int, default=120)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--step-sizes", nargs="+", type=float, default=list(SWEEP_STEPS))
    p.add_argument("--ratios", nargs="+", type=float, default=list(SWEEP_RATIOS))
    p.add_argument("--per-caption", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("httpx", "diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    res = {"table": table, "sweep": sweep, "samples": samples}[args.what](args)
    _save(args, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
