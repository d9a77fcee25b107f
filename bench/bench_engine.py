"""Engine benchmark (run by hand; not part of the test suite): time and memory of

  (a) plain DDIM + CFG sampling on the bare diffusers UNet (diffusers' default attention processors),
  (b) our full pix2pix-zeroCon edit: VAE encode -> regularised DDIM inversion -> guided DDIM sampling
      (cross-attention guidance on all attn2 layers + PatchNCE on up-block attn1 outputs) -> VAE decode,
  (c) diffusers' ``StableDiffusionPix2PixZeroPipeline``: ``invert()`` then ``__call__`` with the same
      steps, regularisation (20/20, 5x5), CFG 5 (caption as negative) and cross-attention guidance 0.1,

on ONE randomly initialised UNet shared by all three (SD1.5's config unless ``--tiny``), in one process.
Text conditionings are random (1, 77, 768) embeddings passed directly (no text encoder needed).

Memory: RSS peak over each phase (a 2 ms sampling thread on /proc/self/status VmRSS, and VmHWM after
resetting it through /proc/self/clear_refs where allowed), and the peak added over the phase's baseline
(RSS after gc + malloc_trim just before the phase). Per-step times come from per-step timestamps.

    ~/venvs/zc/bin/python bench/bench_engine.py --tiny            # seconds: checks that everything runs
    ~/venvs/zc/bin/python bench/bench_engine.py                   # SD1.5-size UNet, 256x256, 10 steps, 2 threads
    ~/venvs/zc/bin/python bench/bench_engine.py --profile         # + torch.profiler of one guided step
    ~/venvs/zc/bin/python bench/bench_engine.py --threads 1 --phases a,b --reuse-guidance-eps   # the opt-in

Targets (full size): time (b)/(c) <= 0.6, peak added memory (b)/(c) <= 0.6, guided step <= 2.0 x plain CFG step.
Step ratios are given in wall time and in process CPU time (per-step ``time.process_time`` stamps): on a shared
machine the CPU-time ratio is the steadier one.
Results: JSON under bench/out/ (gitignored).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, out, write_result  # noqa: E402

from tests.core.tiny import sd_scheduler_config, tiny_unet_config, tiny_vae_config  # noqa: E402
from zerocon_core.common.images import decode_latents, encode_latents  # noqa: E402
from zerocon_core.diffusers_host.denoiser import DiffusersDenoiser, TextCond  # noqa: E402
from zerocon_core.diffusers_host.pipeline import (  # noqa: E402
    EditRun,
    Timings,
    default_guidance,
    invert_and_edit,
    sampling_grid,
)
from zerocon_core.evaluation.command_line import from_args  # noqa: E402
from zerocon_core.method.denoiser import CaptureRequest  # noqa: E402
from zerocon_core.method.guidance import StepContext  # noqa: E402
from zerocon_core.method.inversion import NoiseRegularization  # noqa: E402
from zerocon_core.method.replay import REFERENCES  # noqa: E402
from zerocon_core.method.sampler import BRANCHES, SamplerSettings, cfg_combine, guided_ddim_sample  # noqa: E402

TARGETS = {"time_b_over_c": 0.6, "mem_b_over_c": 0.6, "guided_over_plain_step": 2.0, "guided_over_plain_step_cpu": 2.0}

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    sample_size=512,
    layers_per_block=2,
    norm_num_groups=32,
    act_fn="silu",
    block_out_channels=(128, 256, 512, 512),
    scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
TINY_UNET = tiny_unet_config()  # the core tests' tiny UNet (tests/core/tiny.py)
TINY_VAE = tiny_vae_config()  # the core tests' tiny VAE
SCHEDULER = sd_scheduler_config()  # SD1.x's DDIM schedule, epsilon


# ---------------------------------------------------------------------------------------------------------
# memory


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024.0


_LIBC = None


def trim() -> None:
    """gc + glibc malloc_trim, so freed memory goes back to the OS before a phase's baseline is taken."""
    global _LIBC
    gc.collect()
    try:
        _LIBC = _LIBC or ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_hwm() -> bool:
    """Reset VmHWM (peak RSS) of this process; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """Context manager: baseline RSS at entry and the peak over the block (sampling thread + VmHWM)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.baseline = self.peak = 0.0
        self._stop = threading.Event()
        self._hwm_ok = False

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        trim()
        self.loadavg = os.getloadavg()[0]
        self.cpu0 = time.process_time()
        self.baseline = self.peak = rss_mb()
        self._hwm_ok = reset_hwm()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.cpu = time.process_time() - self.cpu0
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())
        if self._hwm_ok:
            self.peak = max(self.peak, _status_kb("VmHWM") / 1024.0)

    def as_dict(self) -> dict[str, float]:
        return {
            "baseline_rss_mb": round(self.baseline, 1),
            "peak_rss_mb": round(self.peak, 1),
            "peak_added_mb": round(self.peak - self.baseline, 1),
            "hwm_reset": self._hwm_ok,
            "process_cpu_s": self.cpu,
            "loadavg_1min_at_start": self.loadavg,
        }


# ---------------------------------------------------------------------------------------------------------
# models and inputs


def build_models(tiny: bool, seed: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET)).eval().requires_grad_(False)
    vae = AutoencoderKL(**(TINY_VAE if tiny else SD15_VAE)).eval().requires_grad_(False)
    return unet, vae


def build_inputs(size: int, dim: int, seed: int, n_sentences: int = 8) -> dict[str, Any]:
    """A smooth RGB test image (1, 3, size, size) in [0, 1] and random text embeddings (77 tokens, ``dim`` wide)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    image = torch.stack([xx, yy, 0.5 + 0.5 * torch.sin(6.28 * (xx + yy))])[None].float()
    caption = torch.randn(1, 77, dim, generator=g)
    src = caption + 0.3 * torch.randn(n_sentences, 77, dim, generator=g)
    tgt = caption + 0.3 * torch.randn(n_sentences, 77, dim, generator=g)
    return {
        "image": image,
        "caption": caption,
        "source_embeds": src,
        "target_embeds": tgt,
        "delta": tgt.mean(0, keepdim=True) - src.mean(0, keepdim=True),
    }


class VAETimer:
    """Wraps ``vae.encode`` / ``vae.decode`` to add their wall time up (so phases can be compared without the VAE)."""

    def __init__(self, vae) -> None:
        self.vae, self.seconds, self.calls = vae, 0.0, 0
        self._enc, self._dec = vae.encode, vae.decode

    def _wrap(self, fn: Callable) -> Callable:
        def run(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t
                self.calls += 1

        return run

    def __enter__(self) -> VAETimer:
        self.vae.encode, self.vae.decode = self._wrap(self._enc), self._wrap(self._dec)
        return self

    def __exit__(self, *exc) -> None:
        del self.vae.encode, self.vae.decode  # drop the instance attributes: the class methods show again


def step_durations(stamps: list[float], start: float) -> list[float]:
    times = [start, *stamps]
    return [b - a for a, b in zip(times, times[1:])]


def med(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# ---------------------------------------------------------------------------------------------------------
# phases


def phase_plain(unet, inputs, steps: int, cfg: float, latent_hw: int, seed: int) -> dict[str, Any]:
    """(a) plain DDIM + CFG (batch 2: unconditional = caption, conditional = caption + delta) on the bare UNet."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(SCHEDULER)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(1, 4, latent_hw, latent_hw, generator=g)
    emb = torch.cat([inputs["caption"], inputs["caption"] + inputs["delta"]])
    stamps: list[float] = []
    cpu_stamps: list[float] = []
    with PeakRSS() as mem, torch.no_grad():
        t0, c0 = time.perf_counter(), time.process_time()
        for t in sched.timesteps:
            noise = unet(torch.cat([lat, lat]), t, encoder_hidden_states=emb).sample
            un, co = noise.chunk(2)
            lat = sched.step(cfg_combine(un, co, cfg), t, lat).prev_sample
            stamps.append(time.perf_counter())
            cpu_stamps.append(time.process_time())
        wall = time.perf_counter() - t0
    steps_s = step_durations(stamps, t0)
    steps_cpu = step_durations(cpu_stamps, c0)
    return {
        "finite": bool(torch.isfinite(lat).all()),
        "wall_s": wall,
        "step_s": steps_s,
        "step_median_s": med(steps_s),
        "step_cpu_s": steps_cpu,
        "step_cpu_median_s": med(steps_cpu),
        **mem.as_dict(),
    }


@dataclass(frozen=True)
class EngineRun:
    """The edit every phase runs: DDIM ``steps``, CFG, seed, our guided ``branches``, guidance weights
    (``nce_weight`` None: the engine default), our reference mode and the opt-in ``reuse_guidance_eps``."""

    steps: int = 10
    cfg: float = 5.0
    seed: int = 0
    branches: str = "edit"
    xa_weight: float = 0.1
    nce_weight: float | None = None
    reference: str = "inverted"
    reuse_guidance_eps: bool = False

    def sampler_settings(self) -> SamplerSettings:
        return SamplerSettings(
            cfg=self.cfg,
            branches=self.branches,
            seed=self.seed,
            reference=self.reference,
            reuse_guidance_eps=self.reuse_guidance_eps,
            step_mode="raw",
        )


class StepStamps:
    """Wall and CPU time stamps after every inversion / sampling step (``invert_and_edit``'s step callback)."""

    def __init__(self) -> None:
        self.wall: dict[str, list[float]] = {"inversion": [], "sampling": []}
        self.cpu: dict[str, list[float]] = {"inversion": [], "sampling": []}

    def __call__(self, phase: str, i: int, n: int) -> None:
        self.wall[phase].append(time.perf_counter())
        self.cpu[phase].append(time.process_time())


def phase_ours(den: DiffusersDenoiser, vae, inputs, run: EngineRun) -> dict[str, Any]:
    """(b) our edit through the pipeline's core (VAE encode + invert_and_edit + VAE decode)."""
    src = TextCond(inputs["caption"])
    edit = TextCond(inputs["caption"] + inputs["delta"])
    guidance = default_guidance("eps", run.xa_weight, run.nce_weight, step_mode="raw")
    stamps = StepStamps()
    timings = Timings()
    with PeakRSS() as mem, VAETimer(vae) as vt:
        t0 = time.perf_counter()
        with timings.stage("encode"):
            z0 = encode_latents(vae, inputs["image"], "mean")
        z, inv, res = invert_and_edit(
            den,
            z0,
            src,
            edit,
            guidance=guidance,
            settings=run.sampler_settings(),
            run=EditRun(
                steps=run.steps,
                regularization=NoiseRegularization(),
                timings=timings,
                progress=False,
                step_callback=stamps,
            ),
        )
        with timings.stage("decode"):
            img = decode_latents(vae, z)
        wall = time.perf_counter() - t0
    inv_steps = step_durations(stamps.wall["inversion"], t0 + timings["encode"])
    smp_steps = step_durations(stamps.wall["sampling"], stamps.wall["inversion"][-1])
    smp_cpu = step_durations(stamps.cpu["sampling"], stamps.cpu["inversion"][-1])
    return {
        "finite": bool(torch.isfinite(img).all()),
        "skipped_guidance_steps": res.skipped,
        "wall_s": wall,
        "vae_s": vt.seconds,
        "wall_without_vae_s": wall - vt.seconds,
        "stages_s": dict(timings),
        "inversion_step_s": inv_steps[1:],
        "sampling_step_s": smp_steps,
        "guided_step_median_s": med(smp_steps),
        "sampling_step_cpu_s": smp_cpu,
        "guided_step_cpu_median_s": med(smp_cpu),
        "reuse_guidance_eps": run.reuse_guidance_eps,
        "inversion_step_median_s": med(inv_steps[1:]),
        "guidance": [f"{type(t).__name__}(weight={t.weight:g}, layers={t.layers})" for t in guidance],
        "branches": run.branches,
        "reference": res.reference_mode,
        "replayed_steps": res.replayed,
        "record_mb": (inv.record.nbytes / 2**20) if inv.record is not None else 0.0,
        "losses_last_step": res.losses[-1] if res.losses else {},
        **mem.as_dict(),
    }


def diffusers_pipeline(unet, vae):
    """diffusers' ``StableDiffusionPix2PixZeroPipeline`` on ``unet`` / ``vae`` (no text encoder or captioner)."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler
    from diffusers.pipelines.deprecated.stable_diffusion_variants.pipeline_stable_diffusion_pix2pix_zero import (
        StableDiffusionPix2PixZeroPipeline,
    )

    pipe = StableDiffusionPix2PixZeroPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=DDIMScheduler.from_config(SCHEDULER),
        feature_extractor=None,
        safety_checker=None,
        inverse_scheduler=DDIMInverseScheduler.from_config(SCHEDULER),
        caption_generator=None,
        caption_processor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stamp_scheduler_steps(pipe) -> list[float]:
    """Wrap both schedulers' ``step`` to stamp the wall time after each; returns the (growing) stamp list."""
    stamps: list[float] = []
    for sch in (pipe.scheduler, pipe.inverse_scheduler):
        orig = sch.step

        def timed(*a, _orig=orig, **k):
            r = _orig(*a, **k)
            stamps.append(time.perf_counter())
            return r

        sch.step = timed
    return stamps


def phase_diffusers(unet, vae, inputs, steps: int, cfg: float, seed: int, xa: float, size: int) -> dict[str, Any]:
    """(c) diffusers' StableDiffusionPix2PixZeroPipeline: invert() then __call__ on the same UNet and VAE."""
    from PIL import Image

    pipe = diffusers_pipeline(unet, vae)
    arr = (inputs["image"][0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    pil = Image.fromarray(arr)
    stamps = stamp_scheduler_steps(pipe)
    with PeakRSS() as mem, VAETimer(vae) as vt:
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(seed)
        inv = pipe.invert(
            prompt_embeds=inputs["caption"],
            image=pil,
            num_inference_steps=steps,
            guidance_scale=1.0,
            generator=g,
            lambda_auto_corr=20.0,
            lambda_kl=20.0,
            num_reg_steps=5,
            num_auto_corr_rolls=5,
            output_type="pt",
        )
        t_inv = time.perf_counter()
        result = pipe(
            prompt_embeds=inputs["caption"],
            negative_prompt_embeds=inputs["caption"],
            source_embeds=inputs["source_embeds"],
            target_embeds=inputs["target_embeds"],
            latents=inv.latents,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=cfg,
            cross_attention_guidance_amount=xa,
            generator=g,
            output_type="pt",
        )
        wall = time.perf_counter() - t0
    # stamps: `steps` inversion steps, `steps` reference steps, `steps` guided steps
    durs = step_durations(stamps, t0)
    inv_s, ref_s, edit_s = durs[1:steps], durs[steps + 1 : 2 * steps], durs[2 * steps + 1 :]
    return {
        "finite": bool(torch.isfinite(torch.as_tensor(result.images)).all()),
        "wall_s": wall,
        "invert_s": t_inv - t0,
        "call_s": wall - (t_inv - t0),
        "vae_s": vt.seconds,
        "vae_calls": vt.calls,
        "wall_without_vae_s": wall - vt.seconds,
        "inversion_step_median_s": med(inv_s),
        "reference_step_median_s": med(ref_s),
        "guided_step_median_s": med(edit_s),
        **mem.as_dict(),
    }


def restore_unet(unet, processors) -> None:
    """Undo what diffusers' prepare_unet does to the shared UNet (processors, attn2 requires_grad)."""
    unet.set_attn_processor(dict(processors))
    unet.requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------
# one guided step: breakdown and profile


class Clock:
    """Wall and process-CPU time since construction (``lap()`` returns both and restarts)."""

    def __init__(self) -> None:
        self.w, self.c = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        w, c = time.perf_counter(), time.process_time()
        out = (w - self.w, c - self.c)
        self.w, self.c = w, c
        return out


def guided_step_parts(
    den: DiffusersDenoiser,
    inputs,
    steps: int,
    cfg: float,
    xa: float,
    nce: float | None,
    latent_hw: int,
    repeats: int = 3,
) -> dict[str, dict[str, float]]:
    """Time the pieces of one guided step at a mid-grid sigma: reference forward (batch 1, captures),
    differentiable forward (batch 1, captures) + losses, backward to the latent, CFG forward (batch 2), the
    negative's forward alone (batch 1: the CFG step with ``reuse_guidance_eps``); and one plain CFG forward
    (batch 2) through our denoiser with nothing captured. Medians of ``repeats`` (interleaved), wall and CPU s."""
    sigmas = sampling_grid(den, steps)
    k = len(sigmas) // 2
    s = sigmas[k]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, latent_hw, latent_hw, generator=g) * float((1 + s * s) ** 0.5)
    src, edit = TextCond(inputs["caption"]), TextCond(inputs["caption"] + inputs["delta"])
    terms = default_guidance("eps", xa, nce, step_mode="raw")
    layers = den.layers()
    reqs = [t.request(layers) for t in terms]
    merged = CaptureRequest()
    for r in reqs:
        merged = merged | r
    names = ("reference_fwd", "grad_fwd_and_losses", "backward", "cfg_fwd", "negative_fwd", "plain_cfg_fwd_ours")
    parts: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for _ in range(repeats):
        clock = Clock()
        with torch.no_grad():
            (ref,) = den.predict(x, s, [src], merged)
        parts["reference_fwd"].append(clock.lap())
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (p,) = den.predict(xg, s, [edit], merged)
            total = sum(
                term.weight * term.loss(StepContext(k, steps, s, xg, p.eps, p, ref, g), req)
                for term, req in zip(terms, reqs)
            )
            parts["grad_fwd_and_losses"].append(clock.lap())
            torch.autograd.grad(total, xg)
            parts["backward"].append(clock.lap())
        del ref, p, total, xg
        with torch.no_grad():
            den.predict(x, s, [src, edit])
        parts["cfg_fwd"].append(clock.lap())
        with torch.no_grad():
            den.predict(x, s, [src])
        parts["negative_fwd"].append(clock.lap())
        with torch.no_grad():
            den.predict(x, s, [src, edit])
        parts["plain_cfg_fwd_ours"].append(clock.lap())
    return {n: {"wall_s": med([w for w, _ in v]), "cpu_s": med([c for _, c in v])} for n, v in parts.items()}


def profile_guided_step(
    den: DiffusersDenoiser, inputs, steps: int, cfg: float, xa: float, nce: float | None, latent_hw: int, rows: int = 25
) -> str:
    """torch.profiler over one guided step of ``guided_ddim_sample`` (mid-grid sigma); returns the top-ops table."""
    from torch.profiler import ProfilerActivity, profile

    sigmas = sampling_grid(den, steps)
    k = len(sigmas) // 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, latent_hw, latent_hw, generator=g) * float((1 + sigmas[k] ** 2) ** 0.5)
    src, edit = TextCond(inputs["caption"]), TextCond(inputs["caption"] + inputs["delta"])
    kw = dict(
        source_cond=src,
        edit_cond=edit,
        settings=SamplerSettings(cfg=cfg, step_mode="raw"),
        guidance=default_guidance("eps", xa, nce, step_mode="raw"),
    )
    guided_ddim_sample(den, x, sigmas[k : k + 2], **kw)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        guided_ddim_sample(den, x, sigmas[k : k + 2], **kw)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


# ---------------------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The options; ``size`` filled in (256, tiny: 64) and ``phases`` made a set, both checked."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random UNet/VAE (checks that everything runs)")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default 256; tiny: 64)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--xa-weight", type=float, default=0.1)
    ap.add_argument("--nce-weight", type=float, default=None, help="PatchNCE weight (default: the engine default)")
    ap.add_argument("--branches", choices=BRANCHES, default="edit", help="our guided branches (default edit)")
    ap.add_argument(
        "--reference", choices=REFERENCES, default="inverted", help="our reference (default inverted: replayed)"
    )
    ap.add_argument(
        "--reuse-guidance-eps",
        action="store_true",
        help="opt-in SamplerSettings.reuse_guidance_eps (not exact): the CFG step takes the edit noise from the "
        "guidance forward",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--phases", default="a,b,c", help="comma-separated subset of a,b,c")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the per-part timing of one guided step")
    ap.add_argument("--profile", action="store_true", help="torch.profiler over one guided step: top ops")
    ap.add_argument("--out", default=None, help="JSON path (default bench/out/bench_engine-<mode>-<time>.json)")
    args = ap.parse_args(argv)
    args.size = args.size or (64 if args.tiny else 256)
    if args.size % 8:
        ap.error("--size must be a multiple of 8")
    args.phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    if not args.phases <= {"a", "b", "c"}:
        ap.error("--phases takes a subset of a,b,c")
    args.mode = "tiny" if args.tiny else "sd15"
    return args


def setup(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """``(unet, vae, inputs, result skeleton)``: the random models, the inputs and the run's configuration."""
    out(
        f"bench_engine: {args.mode} UNet, {args.size}x{args.size}, {args.steps} steps, cfg {args.cfg}, "
        f"xa {args.xa_weight}, {args.threads} threads, torch {torch.__version__}"
    )
    t = time.perf_counter()
    rss0 = rss_mb()
    unet, vae = build_models(args.tiny, args.seed)
    n_params = sum(p.numel() for p in unet.parameters())
    inputs = build_inputs(args.size, unet.config.cross_attention_dim, args.seed)
    trim()
    out(
        f"built models in {time.perf_counter() - t:.1f}s: UNet {n_params / 1e6:.0f}M params; RSS {rss0:.0f} -> "
        f"{rss_mb():.0f} MB"
    )
    keys = ("size", "steps", "cfg", "xa_weight", "nce_weight", "branches", "reference", "reuse_guidance_eps")
    config = {"mode": args.mode, **{k: getattr(args, k) for k in keys}}
    config.update(threads=args.threads, seed=args.seed, unet_params=n_params)
    return unet, vae, inputs, {"config": config, "env": environment(), "phases": {}}


def run_phases(args: argparse.Namespace, unet, vae, inputs, res: dict[str, Any]) -> str | None:
    """Run the chosen phases, the step breakdown and the profile into ``res``; returns the profile table."""
    latent_hw = args.size // 8
    run = from_args(EngineRun, args)
    original_procs = dict(unet.attn_processors)
    if "a" in args.phases:
        out("(a) plain DDIM + CFG ...")
        res["phases"]["a"] = phase_plain(unet, inputs, args.steps, args.cfg, latent_hw, args.seed)
    den = DiffusersDenoiser(unet, scheduler_config=SCHEDULER)
    if "b" in args.phases:
        out("(b) ours: inversion + guided sampling ...")
        res["phases"]["b"] = phase_ours(den, vae, inputs, run)
    weights = (args.xa_weight, args.nce_weight)
    if not args.no_breakdown:
        out("one guided step, part by part ...")
        res["guided_step_parts_s"] = guided_step_parts(den, inputs, args.steps, args.cfg, *weights, latent_hw)
    den.close()
    if "c" in args.phases:
        out("(c) diffusers StableDiffusionPix2PixZeroPipeline: invert + __call__ ...")
        try:
            res["phases"]["c"] = phase_diffusers(
                unet, vae, inputs, args.steps, args.cfg, args.seed, args.xa_weight, args.size
            )
        finally:
            restore_unet(unet, original_procs)
    if not args.profile:
        return None
    out("profiling one guided step ...")
    den = DiffusersDenoiser(unet, scheduler_config=SCHEDULER)
    res["profile_top_ops"] = profile_guided_step(den, inputs, args.steps, args.cfg, *weights, latent_hw)
    den.close()
    return res["profile_top_ops"]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    unet, vae, inputs, res = setup(args)
    profile_table = run_phases(args, unet, vae, inputs, res)
    res["env"]["loadavg_end"] = os.getloadavg()
    report(res)
    if profile_table:
        out("\ntorch.profiler, one guided step (self CPU time):")
        out(profile_table)
    write_result(res, args.out, f"bench_engine-{args.mode}")
    return 0


PHASE_NAMES = {"a": "(a) plain DDIM+CFG", "b": "(b) ours: invert + guided", "c": "(c) diffusers pix2pix-zero"}


def phase_table(ph: dict[str, Any]) -> None:
    """One row per phase: wall, wall without the VAE, CPU, peak RSS, peak added, median step, load."""
    out(
        "\nphase                                  wall s   w/o VAE s    CPU s   peak RSS MB   peak added MB   step s (median)"
        "   load"
    )
    for k in ("a", "b", "c"):
        if k not in ph:
            continue
        p = ph[k]
        step = p.get("step_median_s", p.get("guided_step_median_s"))
        flag = "" if p.get("finite", True) else "  (NaN/Inf output!)"
        out(
            f"{PHASE_NAMES[k]:<36} {p['wall_s']:>8.2f}   {p.get('wall_without_vae_s', p['wall_s']):>9.2f}   "
            f"{p['process_cpu_s']:>6.1f}   {p['peak_rss_mb']:>11.0f}   {p['peak_added_mb']:>13.0f}   {step:>15.3f}"
            f"   {p['loadavg_1min_at_start']:>4.1f}{flag}"
        )


def phase_ratios(ph: dict[str, Any]) -> dict[str, float]:
    """(b) against (c) in time and memory, and our guided step against the plain CFG step."""
    ratios: dict[str, float] = {}
    if "b" in ph and "c" in ph:
        b, c = ph["b"], ph["c"]
        ratios["time_b_over_c"] = b["wall_s"] / c["wall_s"]
        ratios["time_b_over_c_without_vae"] = b["wall_without_vae_s"] / c["wall_without_vae_s"]
        ratios["cpu_time_b_over_c"] = b["process_cpu_s"] / c["process_cpu_s"]
        ratios["mem_b_over_c"] = b["peak_added_mb"] / max(c["peak_added_mb"], 1e-9)
        ratios["peak_rss_b_over_c"] = b["peak_rss_mb"] / c["peak_rss_mb"]
        ratios["guided_step_b_over_c"] = b["guided_step_median_s"] / c["guided_step_median_s"]
    if "a" in ph and "b" in ph:
        ratios["guided_over_plain_step"] = ph["b"]["guided_step_median_s"] / ph["a"]["step_median_s"]
        ratios["guided_over_plain_step_cpu"] = ph["b"]["guided_step_cpu_median_s"] / ph["a"]["step_cpu_median_s"]
    return ratios


def phase_details(ph: dict[str, Any]) -> None:
    """(b)'s reference, replayed steps, step medians and stages; (c)'s invert / call split and step medians."""
    if "b" in ph:
        b = ph["b"]
        out(f"\n(b) reference {b['reference']}: replayed steps {b['replayed_steps']}, record {b['record_mb']:.1f} MiB")
        out(
            f"(b) guided step median: wall {b['guided_step_median_s']:.3f} s, CPU {b['guided_step_cpu_median_s']:.3f} s"
            + (" (reuse_guidance_eps)" if b["reuse_guidance_eps"] else "")
        )
        if "a" in ph:
            a = ph["a"]
            out(f"(a) plain CFG step median: wall {a['step_median_s']:.3f} s, CPU {a['step_cpu_median_s']:.3f} s")
        out("(b) stages (s): " + ", ".join(f"{k} {v:.2f}" for k, v in ph["b"]["stages_s"].items()))
    if "c" in ph:
        c = ph["c"]
        out(
            f"(c) invert {c['invert_s']:.2f} s, call {c['call_s']:.2f} s, VAE {c['vae_s']:.2f} s ({c['vae_calls']} calls); "
            f"median steps: inversion {c['inversion_step_median_s']:.3f}, reference {c['reference_step_median_s']:.3f}, "
            f"guided {c['guided_step_median_s']:.3f}"
        )


def parts_report(res: dict[str, Any]) -> None:
    """The guided step's parts against our plain CFG forward; adds ``guided_step_from_parts`` to ``res``."""
    parts = res["guided_step_parts_s"]
    out("\none guided step, part by part (median wall s / CPU s), ratios to our plain CFG forward (batch 2)")
    plain = parts["plain_cfg_fwd_ours"]
    for k, v in parts.items():
        out(
            f"  {k:<22} {v['wall_s']:>8.3f} {v['cpu_s']:>8.3f}   {v['wall_s'] / plain['wall_s']:5.2f} x / "
            f"{v['cpu_s'] / plain['cpu_s']:5.2f} x"
        )
    steps = {
        "guided step (reference replayed)": ("grad_fwd_and_losses", "backward", "cfg_fwd"),
        "guided step, reuse_guidance_eps": ("grad_fwd_and_losses", "backward", "negative_fwd"),
        "guided step (reference live)": ("reference_fwd", "grad_fwd_and_losses", "backward", "cfg_fwd"),
    }
    res["guided_step_from_parts"] = {}
    for label, keys in steps.items():
        w = sum(parts[k]["wall_s"] for k in keys) / plain["wall_s"]
        c = sum(parts[k]["cpu_s"] for k in keys) / plain["cpu_s"]
        res["guided_step_from_parts"][label] = {"wall_x": w, "cpu_x": c}
        out(f"  {label:<34} {w:5.2f} x plain (wall) {c:5.2f} x plain (CPU)")


def report(res: dict[str, Any]) -> None:
    """Print the tables; adds ``ratios``, ``targets`` and ``guided_step_from_parts`` to ``res``."""
    ph = res["phases"]
    phase_table(ph)
    ratios = phase_ratios(ph)
    res["ratios"] = ratios
    res["targets"] = {
        k: {"target": v, "value": ratios.get(k), "met": (ratios[k] <= v) if k in ratios else None}
        for k, v in TARGETS.items()
    }
    out("\nratio                              value   target")
    for k, v in ratios.items():
        tgt = TARGETS.get(k)
        verdict = "" if tgt is None else ("  <= %.2f  met" % tgt if v <= tgt else "  <= %.2f  MISSED" % tgt)
        out(f"{k:<32} {v:>7.3f}{verdict}")
    phase_details(ph)
    if "guided_step_parts_s" in res:
        parts_report(res)


if __name__ == "__main__":
    sys.exit(main())
