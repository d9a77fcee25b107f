"""Calibrate the default ``step_size`` of step mode "auto" against today's default raw update (run by hand).

Runs the same edit twice on one model: step mode "raw" with the raw default weights (cross-attention 0.1,
PatchNCE 0.5: what the nodes did before "auto" existed), then "auto" with the default ratios and
``--step-size``. Reports, per step, the update's RMS as a fraction of the latent's RMS (the sampler's own
``StepRecord.update``), its median and mean over the raw run (the auto ``step_size`` that moves the latent as
much as the raw default did), each run's PatchNCE / cross-attention pull, and the wall and CPU time of each
run's sampling (auto takes one backward pass per term).

    python bench/calibrate_auto_step.py                        # random full-size SD1.5 UNet, CPU, 256 px
    python bench/calibrate_auto_step.py --steps 6 --modes raw  # the calibration figure alone (cheaper)
    python bench/calibrate_auto_step.py --model DIR --size 512 # a real SD folder (diffusers layout), on GPU

With random weights the figure only checks the pipeline and the order of magnitude; re-run it with real
weights on a GPU before trusting the shipped default.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from calibrate_patchnce import build  # noqa: E402
from common import calibration_parser, random_edit, write_json  # noqa: E402

from zerocon_core.diffusers_host.pipeline import default_guidance  # noqa: E402
from zerocon_core.method.diagnostics import summarize, summary  # noqa: E402
from zerocon_core.method.inversion import ddim_invert  # noqa: E402
from zerocon_core.method.sampler import AUTO_STEP_SIZE, SamplerSettings, guided_ddim_sample  # noqa: E402
from zerocon_core.method.schedule import ddim_sigmas, inversion_sigmas  # noqa: E402


def run(den, inv, sig, src, edit, mode: str, step_size: float) -> dict:
    terms = default_guidance(den.prediction_type, step_mode=mode)
    settings = SamplerSettings(step_mode=mode, step_size=step_size)
    wall, cpu = time.perf_counter(), time.process_time()
    res = guided_ddim_sample(den, inv.latent, sig, source_cond=src, edit_cond=edit, guidance=terms, settings=settings)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    s = summarize(res)
    return {
        "mode": mode,
        "weights": {type(t).__name__: t.weight for t in terms},
        "update_per_step": [r.update for r in res.records],
        "median_update": statistics.median(r.update for r in res.records),
        "mean_update": s.mean_update,
        "pulls": s.pulls,
        "summary": summary(res),
        "wall_s": wall,
        "cpu_s": cpu,
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = calibration_parser(__doc__, 10, "calibrate_auto_step.json")
    ap.add_argument("--model", help="diffusers SD folder (default: random full-size SD1.5 UNet)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--step-size", type=float, default=AUTO_STEP_SIZE, help="auto run's step size")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--modes", default="raw,auto", help="runs, comma-separated (raw alone gives the calibration)")
    return ap.parse_args(argv)


def run_modes(args: argparse.Namespace, dtype: torch.dtype) -> list[dict]:
    """Invert one random latent, then sample it once per mode of ``--modes``."""
    den = build(args.model, args.device, dtype, args.seed)
    latent, src, edit = random_edit(args.seed, args.size, args.device)
    sig = ddim_sigmas(den.sigma_table, args.steps, final="zero")
    inv = ddim_invert(den, latent, inversion_sigmas(sig), src, keep_trajectory=False)
    sig = sig.to(latent.device)
    runs = []
    for mode in args.modes.split(","):
        runs.append(run(den, inv, sig, src, edit, mode, args.step_size))
        r = runs[-1]
        sys.stdout.write(f"{mode}: median update {100 * r['median_update']:.3f}% ({r['wall_s']:.0f} s)\n")
        sys.stdout.flush()
    return runs


def report(result: dict, runs: list[dict], out_path: str) -> str:
    """The per-run table (update per step, pulls, sampling time) and the time ratio of two runs."""
    lines = []
    for r in runs:
        lines.append(
            f"{r['mode']:>4}: weights {r['weights']}; update per step (% of latent RMS) "
            + " ".join(f"{100 * u:.2f}" for u in r["update_per_step"])
        )
        lines.append(
            f"      median {100 * r['median_update']:.2f}%, mean {100 * r['mean_update']:.2f}%; pulls {r['pulls']}; "
            f"sampling {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU"
        )
        lines.append(f"      {r['summary']}")
    if len(runs) == 2:
        lines.append(
            f"{runs[1]['mode']}/{runs[0]['mode']} sampling time: {result['second_over_first_wall']:.2f} wall, "
            f"{result['second_over_first_cpu']:.2f} CPU"
        )
    lines.append(f"wrote {out_path}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    runs = run_modes(args, dtype)
    result = {
        "model": args.model or "random SD1.5 UNet (diffusers config)",
        "size": args.size,
        "steps": args.steps,
        "device": args.device,
        "dtype": str(dtype),
        "runs": runs,
    }
    if len(runs) == 2:
        result["second_over_first_wall"] = runs[1]["wall_s"] / runs[0]["wall_s"]
        result["second_over_first_cpu"] = runs[1]["cpu_s"] / runs[0]["cpu_s"]
    write_json(args.out, result)
    sys.stdout.write(report(result, runs, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
