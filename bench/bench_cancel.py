"""How long Cancel takes to stop a guided edit: ComfyUI's interrupt pressed at several moments inside guided steps.

Runs inside ComfyUI's environment on a random full-size SD1.5 UNet (ComfyUI's own classes, as ``bench_comfyui``):
DDIM Inversion, then the Guided Sampler (cross-attention + PatchNCE) in a worker thread; the main thread presses
ComfyUI's interrupt ``--delay`` seconds after each guided step begins (a moment inside its forwards or backward)
and times how long the sampler takes to raise ``InterruptProcessingException``. Also prints one guided step's length
for scale: before the pack checked the interrupt inside a step, Cancel waited for the step's end.

    COMFYUI_PATH=~/ComfyUI <comfy-python> bench/bench_cancel.py --size 512 --delays 1,3,6
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, start_comfyui, write_json  # noqa: E402


def prepare(args: argparse.Namespace) -> tuple:
    """The pack's sampling nodes and the guided sampler's inputs (model, 4-step inversion, prompts, terms)."""
    import torch
    from bench_comfyui import build_model, guidance_chain, load_pack, run_node

    sampling, guidance = load_pack()
    model, ctx, _ = build_model("sd15", 0)
    gen = torch.Generator().manual_seed(1)
    source, edited = ([[torch.randn(1, 77, ctx, generator=torch.Generator().manual_seed(s)), {}]] for s in (1, 2))
    latent = {"samples": torch.randn(1, 4, args.size // 8, args.size // 8, generator=gen)}
    terms = guidance_chain(guidance, 0.1, 0.5)
    inv_kw = dict(model=model, latent=latent, conditioning=source, steps=4, cfg=1.0, regularize=False,
                  lambda_ac=20.0, lambda_kl=20.0, reg_outer=1, reg_rolls=1, seed=0, guidance=terms)  # fmt: skip
    _, inversion, _ = run_node(sampling.ZeroConDDIMInversion, **inv_kw)
    kw = dict(model=model, inversion=inversion, edited=edited, cfg=5.0, step_mode="auto", step_size=0.02,
              branches="edit", seed=0, guidance=terms)  # fmt: skip
    return sampling, kw


def cancel_latency(sampling, kw: dict, step_started: threading.Event, delay: float) -> float | None:
    """Seconds from pressing Cancel ``delay`` s into a guided step to the sampler's stop (None: it finished)."""
    import comfy.model_management as mm
    from bench_comfyui import run_node

    step_started.clear()
    outcome: dict = {}

    def work():
        try:
            run_node(sampling.ZeroConGuidedSampler, **kw)
        except mm.InterruptProcessingException:
            outcome["stopped"] = time.perf_counter()

    worker = threading.Thread(target=work)
    worker.start()
    step_started.wait()
    time.sleep(delay)
    pressed = time.perf_counter()
    mm.interrupt_current_processing(True)
    worker.join()
    mm.interrupt_current_processing(False)
    return outcome["stopped"] - pressed if "stopped" in outcome else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    ap.add_argument("--delays", default="1,3,6", help="seconds after a guided step begins to press Cancel")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "bench" / "out"))
    args = ap.parse_args(argv)
    start_comfyui(args.threads)
    from bench_comfyui import run_node

    sampling, kw = prepare(args)
    step_started = threading.Event()
    real_step = sampling.guided_ddim_sample.__globals__["_guidance_step"]

    def marking_step(*a, **k):  # a guided step begins: its forwards and backward follow
        step_started.set()
        return real_step(*a, **k)

    sampling.guided_ddim_sample.__globals__["_guidance_step"] = marking_step
    t0 = time.perf_counter()
    run_node(sampling.ZeroConGuidedSampler, **kw)
    res: dict = {"size": args.size, "threads": args.threads, "guided_step_s": (time.perf_counter() - t0) / 4}
    res["cancel_latency_s"] = {}
    for delay in (float(d) for d in args.delays.split(",")):
        res["cancel_latency_s"][str(delay)] = cancel_latency(sampling, kw, step_started, delay)
    sampling.guided_ddim_sample.__globals__["_guidance_step"] = real_step
    path = write_json(Path(args.out) / f"bench_cancel_{args.size}.json", res)
    lines = [f"SD1.5 {args.size}px, CPU, {args.threads} thread(s): one guided step {res['guided_step_s']:.1f} s"]
    for delay, latency in res["cancel_latency_s"].items():
        shown = "finished without stopping" if latency is None else f"{latency:.2f} s"
        lines.append(f"Cancel pressed {delay} s into a guided step: stopped after {shown}")
    sys.stdout.write("\n".join(lines + [f"wrote {path}"]) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
