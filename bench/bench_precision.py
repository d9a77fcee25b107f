"""Precision benchmark: the guided step in fp32, bf16 and fp16 on the random full-size SD1.5 UNet, in ONE process.

Runs inside ComfyUI's environment. For each precision the UNet is built as ComfyUI's loader builds it
(``bench_comfyui.build_model``: the same seeded weights, rounded to the dtype) and computes in that dtype
(``--bf16-unet`` / ``--fp16-unet`` on a device that runs them; "fp16-cast" is fp16 weights cast per layer to
fp32, what ComfyUI does with ``--fp16-unet`` on a CPU). Each does the same edit: DDIM inversion recording the
guidance's reference maps, the guided sampler (cross-attention + PatchNCE), and the unguided sampler from the
same inversion. Reported per precision: guided step time (median wall and CPU time per step), the UNet's
weight memory, peak memory added by the guided run (RSS above the value before it, freed heap returned to the
OS first, on CPU; peak allocated VRAM on GPU), the steps whose guidance was skipped, and the
agreement with fp32 (relative L2 distance of the final latents; the unguided one for comparison).

    COMFYUI_PATH=~/ComfyUI <comfy-python> bench/bench_precision.py --size 256 --steps 5          # CPU
    COMFYUI_PATH=~/ComfyUI <comfy-python> bench/bench_precision.py --gpu --size 512 --steps 10   # GPU

A precision that cannot run on the device is reported as skipped with the error. Writes bench/out/*.json.
``--gpu`` has not been run yet (no GPU was available when this was written): treat its first figures with care.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_comfyui as bc  # noqa: E402

PRECISIONS = ("fp32", "bf16", "fp16", "fp16-cast")


def _dtypes(name: str):
    import torch

    return {
        "fp32": (torch.float32, None),
        "bf16": (torch.bfloat16, None),
        "fp16": (torch.float16, None),
        "fp16-cast": (torch.float16, torch.float32),
    }[name]


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc), so that a later run's RSS peak counts its own memory
    instead of reusing pages an earlier precision left resident."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


class Runner:
    """The same edit at every precision: inversion recording the guidance's references, the guided sampler
    (its steps timed, its engine result kept for the skipped steps) and the unguided sampler."""

    def __init__(self, args: argparse.Namespace, sampling, cuda: bool) -> None:
        import comfy.utils
        import torch

        self.args, self.sampling, self.cuda = args, sampling, cuda
        self.source, self.edited = (
            [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(s)), {}]] for s in (1, 2)
        )
        h = args.size // 8
        self.latent = {"samples": torch.randn(1, 4, h, h, generator=torch.Generator().manual_seed(3))}
        self.clock = bc.StepClock()
        comfy.utils.set_progress_bar_global_hook(self.clock.hook)
        self.engine_results: list = []
        real_engine = sampling.guided_ddim_sample

        def recording(*a, **kw):
            self.engine_results.append(real_engine(*a, **kw))
            return self.engine_results[-1]

        sampling.guided_ddim_sample = recording  # to read the skipped steps of each run

    def invert(self, model, g):
        kw = dict(cfg=1.0, regularize=False, lambda_ac=20.0, lambda_kl=20.0, reg_outer=5, reg_rolls=5, seed=0)
        return bc.run_node(
            self.sampling.ZeroConDDIMInversion,
            model=model,
            latent=self.latent,
            conditioning=self.source,
            steps=self.args.steps,
            guidance=g,
            **kw,
        )

    def sample(self, model, inversion, g):
        kw = dict(cfg=self.args.cfg, step_mode="raw", step_size=0.02, branches="edit", seed=0)
        return bc.run_node(
            self.sampling.ZeroConGuidedSampler, model=model, inversion=inversion, edited=self.edited, guidance=g, **kw
        )

    def guided(self, model, inversion, g) -> tuple[dict, dict]:
        """The guided run, timed and its peak memory measured: ``(edit, figures)``."""
        import torch

        self.clock.stamps.clear()
        self.engine_results.clear()
        gc.collect()
        _trim_heap()
        with bc.Peak(self.cuda) as pk:
            cpu0, start = time.process_time(), time.perf_counter()
            edit = self.sample(model, inversion, g)[0]  # (edit, reconstruction, diagnostics...)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
        per_step = [w for w, _ in self.clock.per_step((start, cpu0))]
        return edit, {
            "guided_step_s": statistics.median(per_step[1:] or per_step),
            "guided_cpu_s_per_step": cpu / self.args.steps,
            "guided_total_s": wall,
            "guided_peak_added_mb": pk.added,
            "skipped_steps": list(self.engine_results[-1].skipped),
            "finite": bool(torch.isfinite(edit["samples"]).all()),
        }

    def run(self, name: str, g) -> tuple[dict, tuple | None]:
        """Precision ``name``'s figures and ``(guided, unguided)`` final latents (None where it cannot run)."""
        import comfy.model_management as mm

        dtype, compute = _dtypes(name)
        mm.unload_all_models()
        model = None
        try:
            model, _, _ = bc.build_model("sd15", 0, dtype=dtype, compute_dtype=compute)
            model_mb = model.model_size() / 2**20
            _, inversion, _ = self.invert(model, g)
            edit, figures = self.guided(model, inversion, g)
            plain = self.sample(model, inversion, None)[0]
        except Exception as exc:  # e.g. an op this torch has no kernel for in that dtype on that device
            sys.stdout.write(f"{name}: cannot run here: {type(exc).__name__}: {exc}\n")
            return {"skipped_precision": f"{type(exc).__name__}: {exc}"}, None
        finally:
            del model
            mm.unload_all_models()
        run = {"weights": str(dtype), "weights_mb": model_mb, "compute": str(compute or dtype), **figures}
        return run, (edit["samples"].float(), plain["samples"].float())


def compare(res: dict, finals: dict) -> None:
    """Each precision's final latents and guided step time against fp32's."""
    ref_edit, ref_plain = finals["fp32"]
    for name, (e, p) in finals.items():
        run = res["runs"][name]
        run["rel_l2_vs_fp32"] = _rel(e, ref_edit)
        run["rel_l2_vs_fp32_unguided"] = _rel(p, ref_plain)
        run["guided_step_vs_fp32"] = run["guided_step_s"] / res["runs"]["fp32"]["guided_step_s"]


def report(args: argparse.Namespace, res: dict, cuda: bool, path: Path) -> str:
    unit = "VRAM" if cuda else "RSS"
    lines = [
        f"guided step, SD1.5 (random) {args.size}px, {args.steps} steps, {res['device']}, {args.threads} threads, "
        f"torch {res['torch']}",
        f"{'precision':<10} {'step s':>8} {'CPU s/step':>10} {'x fp32':>7} {'weights MB':>10} {'peak ' + unit + ' MB':>14} "
        f"{'skipped':>8} {'rel L2 vs fp32':>15} {'(unguided)':>11}",
    ]
    for name, run in res["runs"].items():
        if "skipped_precision" in run:
            lines.append(f"{name:<10} cannot run: {run['skipped_precision']}")
            continue
        lines.append(
            f"{name:<10} {run['guided_step_s']:>8.2f} {run['guided_cpu_s_per_step']:>10.2f} "
            f"{run['guided_step_vs_fp32']:>7.2f} {run['weights_mb']:>10.0f} {run['guided_peak_added_mb']:>14.0f} {len(run['skipped_steps']):>8} "
            f"{run['rel_l2_vs_fp32']:>15.4f} {run['rel_l2_vs_fp32_unguided']:>11.4f}"
        )
    lines.append(f"wrote {path}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--xa", type=float, default=0.1)
    ap.add_argument("--nce", type=float, default=0.5)
    ap.add_argument("--precisions", default=",".join(PRECISIONS), help=f"comma-separated, from {PRECISIONS}")
    ap.add_argument("--gpu", action="store_true", help="use the GPU (default: --cpu)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(bc.REPO / "bench" / "out"))
    args = ap.parse_args(argv)
    names = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if names[0] != "fp32" or any(n not in PRECISIONS for n in names):
        ap.error(f"--precisions: fp32 first (the reference), then any of {PRECISIONS[1:]}")

    sys.path.insert(0, str(bc.COMFYUI))
    from comfy.cli_args import args as cargs

    cargs.cpu = not args.gpu
    import torch

    torch.set_num_threads(args.threads)
    import comfy.model_management as mm

    sampling, guidance = bc.load_pack()
    cuda = args.gpu and torch.cuda.is_available()
    runner = Runner(args, sampling, cuda)
    res: dict = {
        "size": args.size,
        "steps": args.steps,
        "device": str(mm.get_torch_device()),
        "threads": args.threads,
        "torch": torch.__version__,
        "runs": {},
    }
    finals: dict = {}
    with torch.inference_mode():
        g = bc.guidance_chain(guidance, args.xa, args.nce)
        for name in names:
            res["runs"][name], final = runner.run(name, g)
            if final is not None:
                finals[name] = final
    compare(res, finals)
    path = bc.write_json(Path(args.out) / f"bench_precision_{args.size}_{'gpu' if cuda else 'cpu'}.json", res)
    sys.stdout.write(report(args, res, cuda, path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
