"""DiffuseIT cost benchmark (run by hand; not part of the test suite): time and memory of one sampler step

  (a) plain DDIM + CFG (batch 2: negative + target prompt), no guidance;
  (b) one DiffuseIT guided step, decoding the predicted clean latent with the FULL SD VAE decoder;
  (c) the same guided step decoding with a TINY decoder (diffusers ``AutoencoderTiny``, TAESD's config);

on randomly initialised full-size models, all in ONE process: SD1.5's UNet and VAE (``bench_engine``'s
configs), DINO ViT-B/8 (transformers ``ViTModel`` with ``facebook/dino-vitb8``'s shape: patch 8, 768 wide,
12 blocks, 12 heads) and TAESD (``AutoencoderTiny`` defaults = ``madebyollin/taesd``'s config). Nothing is
downloaded. Text conditionings are random (1, 77, 768) embeddings.

A step is one ``zerocon_core.diffuseit.guidance.diffuseit_sample`` step from DiffuseIT's start level (sigma ~6 on the
50-step DDIM grid: the "auto" strength), without resampling (a resampling repeat costs one more guided
step). The phases run in rounds, one step each, interleaved a, b, c (so that a change of load on a shared
machine hits them alike): a first, warm-up round (it also computes the source and reference DINO features
once) and ``--steps`` timed rounds; medians over those. The guidance is DiffuseIT's full objective (``diffuseit_guidance``): image-guided by
default (DINO key self-similarity + contrastive structure, [CLS] + pixel style toward a reference image,
semantic divergence, range), or ``--mode text`` (no style term). A guided step is then: UNet forward with
autograd (batch 1, target prompt) -> decode -> DINO forward -> losses -> backward through DINO, the
decoder and the UNet to the latent -> the CFG UNet forward (batch 2, no grad) of the DDIM step itself.

Time: wall seconds and this process's CPU seconds (all threads). On a shared CPU the CPU time is the less
load-sensitive of the two, but OpenMP spin-waiting inflates both under contention: run on a quiet machine
(each row shows the load average). Memory: peak of each step above the RSS just before it (``bench_engine.
PeakRSS``: a 2 ms sampling thread plus VmHWM; the largest over the rounds), or on ``--gpu`` the peak CUDA
allocation above the allocation before the step. A breakdown times the parts of one guided step separately
(each decoder, interleaved; medians of ``--repeats``), with the backward split into DINO (+ losses),
decoder and UNet by differentiating stage by stage.

    ~/venvs/zc/bin/python bench/bench_diffuseit.py --tiny        # seconds: checks that everything runs
    ~/venvs/zc/bin/python bench/bench_diffuseit.py               # full size, 256x256, CPU, 2 threads
    python bench/bench_diffuseit.py --gpu --size 512 --steps 5   # on a CUDA machine (add --dtype fp16)

Results: JSON under bench/out/ (gitignored) and a table on stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_engine import SCHEDULER, PeakRSS, build_inputs, build_models, med, rss_mb, trim  # noqa: E402
from common import environment, out, write_result  # noqa: E402

from tests.core.tiny_vision import tiny_dino_config  # noqa: E402
from zerocon_core.common.images import encode_latents  # noqa: E402
from zerocon_core.diffuseit.guidance import diffuseit_guidance, diffuseit_sample  # noqa: E402
from zerocon_core.diffuseit.start import start_index  # noqa: E402
from zerocon_core.diffusers_host.denoiser import DiffusersDenoiser, TextCond  # noqa: E402
from zerocon_core.diffusers_host.pipeline import sampling_grid  # noqa: E402
from zerocon_core.method.guidance import StepContext  # noqa: E402
from zerocon_core.method.sampler import SamplerSettings  # noqa: E402

#: facebook/dino-vitb8's shape (ViT-B/8). Weights are random here.
DINO_VITB8 = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    image_size=224,
    patch_size=8,
    qkv_bias=True,
    layer_norm_eps=1e-6,
    hidden_act="gelu",
)
TINY_DINO = tiny_dino_config()  # the core tests' tiny DINO (tests/core/tiny_vision.py)
#: madebyollin/taesd's config = diffusers AutoencoderTiny's defaults (64 channels, 1/3/3/3 and 3/3/3/1 blocks).
TAESD: dict = {}
TINY_TAESD = dict(
    encoder_block_out_channels=(8, 8, 8, 8),
    decoder_block_out_channels=(8, 8, 8, 8),
    num_encoder_blocks=(1, 1, 1, 1),
    num_decoder_blocks=(1, 1, 1, 1),
)
GRID_STEPS = 50  # the DDIM grid the start level is picked on (the sampler node's default)
PHASES = {"a": "(a) plain DDIM+CFG step", "b": "(b) DiffuseIT, full VAE", "c": "(c) DiffuseIT, tiny decoder"}


# ---------------------------------------------------------------------------------------------------------
# device helpers


@dataclass(frozen=True)
class Clock:
    """A reading (or a difference) of two clocks: ``wall`` (perf_counter) and ``cpu`` (this process's CPU time,
    all threads: robust to other processes on a shared machine; about ``threads x wall`` when quiet)."""

    wall: float = 0.0
    cpu: float = 0.0

    def __sub__(self, other: Clock) -> Clock:
        return Clock(self.wall - other.wall, self.cpu - other.cpu)

    def __add__(self, other: Clock) -> Clock:
        return Clock(self.wall + other.wall, self.cpu + other.cpu)


def med_clock(xs: list[Clock]) -> dict[str, float]:
    return {"wall": med([x.wall for x in xs]), "cpu": med([x.cpu for x in xs])}


class Dev:
    """Where the models run; ``sync()`` before reading a clock on CUDA."""

    def __init__(self, gpu: bool, dtype: torch.dtype) -> None:
        if gpu and not torch.cuda.is_available():
            raise SystemExit("--gpu: no CUDA device available")
        self.device = torch.device("cuda") if gpu else torch.device("cpu")
        self.gpu = gpu
        self.dtype = dtype

    def sync(self) -> None:
        if self.gpu:
            torch.cuda.synchronize()

    def now(self) -> Clock:
        self.sync()
        return Clock(time.perf_counter(), time.process_time())


class PeakCUDA:
    """Like ``PeakRSS`` for CUDA: allocated memory at entry and the peak over the block."""

    def __enter__(self) -> PeakCUDA:
        trim()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self.baseline = torch.cuda.memory_allocated() / 2**20
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated() / 2**20

    def as_dict(self) -> dict[str, float]:
        return {
            "baseline_alloc_mb": round(self.baseline, 1),
            "peak_alloc_mb": round(self.peak, 1),
            "peak_added_mb": round(self.peak - self.baseline, 1),
        }


def peak_memory(dev: Dev):
    return PeakCUDA() if dev.gpu else PeakRSS()


# ---------------------------------------------------------------------------------------------------------
# models


def build_dino(tiny: bool, seed: int):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    return (
        ViTModel(ViTConfig(**(TINY_DINO if tiny else DINO_VITB8)), add_pooling_layer=False).eval().requires_grad_(False)
    )


def build_taesd(tiny: bool, seed: int):
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return AutoencoderTiny(**(TINY_TAESD if tiny else TAESD)).eval().requires_grad_(False)


class Decoder:
    """The DiffuseIT terms' ``decode``: model latent (what the UNet denoises) -> image in [0, 1], differentiable,
    not clamped. Full VAE: ``vae.decode(z / scaling_factor + shift)``; TAESD (scaling factor 1) decodes the
    UNet's latents directly. Both output [-1, 1]. While ``record``: keeps its last input and output (``last_latent``,
    ``last``) and appends its time to ``seconds``."""

    def __init__(self, vae, dev: Dev) -> None:
        self.vae, self.dev = vae, dev
        self.scale = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
        self.shift = float(getattr(vae.config, "shift_factor", 0.0) or 0.0)
        self.record = False
        self.seconds: list[Clock] = []
        self.last: torch.Tensor | None = None
        self.last_latent: torch.Tensor | None = None

    def __call__(self, latent: torch.Tensor) -> torch.Tensor:
        t = self.dev.now() if self.record else Clock()
        param = next(self.vae.parameters())
        z = latent.to(device=param.device, dtype=param.dtype) / self.scale + self.shift
        image = (self.vae.decode(z).sample.float() + 1.0) / 2.0
        if self.record:
            self.seconds.append(self.dev.now() - t)
            self.last, self.last_latent = image, latent
        return image


class ForwardTimer:
    """Times each forward of ``module`` (hooks) while ``on``; keeps the input pixel values of the last one."""

    def __init__(self, module: torch.nn.Module, dev: Dev) -> None:
        self.dev, self.on, self.seconds, self._t = dev, False, [], Clock()
        self._h = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, *_):
        if self.on:
            self._t = self.dev.now()

    def _post(self, *_):
        if self.on:
            self.seconds.append(self.dev.now() - self._t)

    def close(self) -> None:
        for h in self._h:
            h.remove()


# ---------------------------------------------------------------------------------------------------------
# phases


@dataclass
class StepInputs:
    """What every timed step shares: the denoiser, the clean latent ``z0``, the negative and target prompts,
    CFG, the seed and the device."""

    den: Any
    z0: torch.Tensor
    neg: Any
    pos: Any
    cfg: float
    seed: int
    dev: Dev

    def settings(self) -> SamplerSettings:
        """One guided DDIM step without resampling."""
        return SamplerSettings(cfg=self.cfg, resample=1, seed=self.seed)

    def sample(self, grid: torch.Tensor, terms) -> Any:
        return diffuseit_sample(
            self.den,
            self.z0,
            grid,
            cond=self.pos,
            negative_cond=self.neg,
            guidance=terms,
            strength=None,
            settings=self.settings(),
        )


def sampler_step(inp: StepInputs, grid: torch.Tensor, terms) -> dict[str, Any]:
    """One ``diffuseit_sample`` step from DiffuseIT's start (``grid`` = the DDIM grid cut one level below the
    start), no resampling: its time and its peak memory above the memory before it."""
    with peak_memory(inp.dev) as mem:
        t0 = inp.dev.now()
        res = inp.sample(grid, terms)
        took = inp.dev.now() - t0
    return {
        "time": took,
        "finite": bool(torch.isfinite(res.latent).all()),
        "skipped": bool(res.skipped),
        "losses": res.losses[0] if res.losses else {},
        "mem": mem.as_dict(),
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Round 0 is the first step (it also computes the source / reference DINO features); medians over the rest."""
    timed = runs[1:] or runs
    m = med_clock([r["time"] for r in timed])
    worst = max((r["mem"] for r in runs), key=lambda d: d["peak_added_mb"])
    return {
        "finite": all(r["finite"] for r in runs),
        "skipped_steps": sum(r["skipped"] for r in runs),
        "step_median_s": m["wall"],
        "step_median_cpu_s": m["cpu"],
        "step_wall_s": [r["time"].wall for r in timed],
        "step_cpu_s": [r["time"].cpu for r in timed],
        "first_step_s": runs[0]["time"].wall,
        "losses_first_step": runs[0]["losses"],
        "peak_added_mb_per_step": [r["mem"]["peak_added_mb"] for r in runs],
        **worst,
    }


PART_KEYS = ("unet_fwd_grad", "decode_fwd", "dino_fwd", "losses", "dino_bwd", "decode_bwd", "unet_bwd", "cfg_fwd")


def _grad_pass(inp: StepInputs, x: torch.Tensor, sigmas: tuple, terms, decoder: Decoder, gen) -> list[Clock]:
    """Time the guidance's gradient pass at ``sigmas = (sigma, sigma_next)`` stage by stage: UNet forward,
    losses (decoder and DINO inside), backward to the image, to the latent x0, to x."""
    dev, (sigma, sigma_next) = inp.dev, sigmas
    state: dict = {}
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        t = dev.now()
        (p,) = inp.den.predict(xg, sigma, [inp.pos])
        t_unet = dev.now() - t
        t = dev.now()
        ctx = StepContext(0, 1, sigma, xg, p.eps, p, None, gen, sigma_next, state)
        total = sum(term.weight * term.loss(ctx, term.request([])) for term in terms)
        t_loss = dev.now() - t
        image, x0 = decoder.last, decoder.last_latent
        t = dev.now()
        (g_img,) = torch.autograd.grad(total, image)
        t_dino_b = dev.now() - t
        t = dev.now()
        (g_x0,) = torch.autograd.grad(image, x0, grad_outputs=g_img)
        t_dec_b = dev.now() - t
        t = dev.now()
        (g_x,) = torch.autograd.grad(x0, xg, grad_outputs=g_x0)
        t_unet_b = dev.now() - t
    assert torch.isfinite(g_x).all()
    decoder.last = decoder.last_latent = None
    return [t_unet, t_loss, t_dino_b, t_dec_b, t_unet_b]


def step_parts(
    inp: StepInputs,
    x: torch.Tensor,
    sigmas: tuple,
    terms,
    timers: tuple[Decoder, ForwardTimer],
    repeats: int,
    warmup: bool,
) -> dict[str, list[Clock]]:
    """The parts of one guided step at ``sigmas = (sigma, sigma_next)``, ``repeats`` times (with ``warmup``, one
    untimed evaluation first, which also caches the source / reference DINO features on the terms as the
    sampler's first step does); ``timers``: the decoder and the DINO forward timer.

    unet_fwd_grad (batch 1, autograd), decode_fwd, dino_fwd, losses (the rest of the terms' loss code),
    dino_bwd (loss -> decoded image: losses, DINO and its resize), decode_bwd (image -> latent x0),
    unet_bwd (x0 -> x), cfg_fwd (batch 2, no grad: the DDIM step's forward = a plain step)."""
    decoder, dino_timer = timers
    parts: dict[str, list[Clock]] = {k: [] for k in PART_KEYS}
    gen = torch.Generator().manual_seed(0)
    for r in range(repeats + int(warmup)):
        timed = r >= int(warmup)
        decoder.record, dino_timer.on = True, timed
        decoder.seconds.clear()
        dino_timer.seconds.clear()
        t_unet, t_loss, t_dino_b, t_dec_b, t_unet_b = _grad_pass(inp, x, sigmas, terms, decoder, gen)
        t = inp.dev.now()
        with torch.no_grad():
            inp.den.predict(x, sigmas[0], [inp.neg, inp.pos])
        t_cfg = inp.dev.now() - t
        if not timed:
            continue
        dec_f, dino_f = sum(decoder.seconds, Clock()), sum(dino_timer.seconds, Clock())
        values = (t_unet, dec_f, dino_f, t_loss - dec_f - dino_f, t_dino_b, t_dec_b, t_unet_b, t_cfg)
        for k, v in zip(PART_KEYS, values):
            parts[k].append(v)
    decoder.record = dino_timer.on = False
    return parts


def profile_step(inp: StepInputs, grid: torch.Tensor, terms, rows: int = 25) -> str:
    """torch.profiler over one guided step (after the source features are cached); top ops by self time."""
    from torch.profiler import ProfilerActivity, profile

    one = grid[: start_index(grid) + 2]
    inp.sample(one, terms)  # warm-up
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() and inp.z0.is_cuda else [])
    with profile(activities=acts) as prof:
        inp.sample(one, terms)
    sort = "self_device_time_total" if len(acts) > 1 else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


# ---------------------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The options; ``size`` filled in (256, tiny: 64), ``phases`` made a set, ``kind`` / ``where`` added."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random models (checks that everything runs)")
    ap.add_argument("--gpu", action="store_true", help="run on CUDA (memory: peak CUDA allocation)")
    ap.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="model weights (default fp32)")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default 256; tiny: 64)")
    ap.add_argument(
        "--steps", type=int, default=3, help="timed steps per phase after a warm-up step (median over them; default 3)"
    )
    ap.add_argument("--repeats", type=int, default=2, help="repeats of the per-part breakdown (median; default 2)")
    ap.add_argument(
        "--mode",
        choices=("image", "text"),
        default="image",
        help="image: structure + style (reference) + semantic + range; text: no style term",
    )
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--dino-size", type=int, default=224, help="DINO input short side (DiffuseIT 224)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--phases", default="a,b,c", help="comma-separated subset of a,b,c")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the per-part timing")
    ap.add_argument("--profile", action="store_true", help="torch.profiler over one guided step per decoder")
    ap.add_argument(
        "--out",
        default=None,
        help="JSON path (default bench/out/bench_diffuseit-<kind>-<device>-<size>-<mode>-<time>.json)",
    )
    args = ap.parse_args(argv)
    args.size = args.size or (64 if args.tiny else 256)
    if args.size % 8:
        ap.error("--size must be a multiple of 8")
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    args.phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    if not args.phases <= set(PHASES):
        ap.error("--phases takes a subset of a,b,c")
    args.kind, args.where = ("tiny" if args.tiny else "sd15"), ("cuda" if args.gpu else "cpu")
    return args


def build(args: argparse.Namespace, dev: Dev) -> tuple[dict[str, Any], dict[str, int]]:
    """The random models (UNet, VAE, DINO, TAESD) on ``dev`` and their (decoder) parameter counts."""
    unet, vae = build_models(args.tiny, args.seed)
    models = {"unet": unet, "vae": vae, "dino": build_dino(args.tiny, args.seed + 1)}
    models["taesd"] = build_taesd(args.tiny, args.seed + 2)
    if dev.gpu or dev.dtype != torch.float32:
        for m in models.values():
            m.to(device=dev.device, dtype=dev.dtype)
    n_params = {
        "unet": sum(p.numel() for p in unet.parameters()),
        "vae_decoder": sum(p.numel() for p in vae.decoder.parameters())
        + sum(p.numel() for p in vae.post_quant_conv.parameters()),
        "taesd_decoder": sum(p.numel() for p in models["taesd"].decoder.parameters()),
        "dino": sum(p.numel() for p in models["dino"].parameters()),
    }
    return models, n_params


@dataclass
class Bench:
    """The built benchmark: step inputs, models, source / reference images, the DDIM grid and DiffuseIT's
    start index on it, one decoder per guided phase and the DINO forward timer."""

    inp: StepInputs
    models: dict[str, Any]
    source: torch.Tensor
    reference: torch.Tensor
    grid: torch.Tensor
    k: int
    decoders: dict[str, Decoder]
    dino_timer: ForwardTimer

    def terms(self, ph: str, args: argparse.Namespace) -> tuple:
        """DiffuseIT's guidance terms decoding with phase ``ph``'s decoder (no style reference in text mode)."""
        ref = self.reference if args.mode == "image" else None
        return diffuseit_guidance(self.models["dino"], self.decoders[ph], self.source, ref, dino_size=args.dino_size)


def setup(args: argparse.Namespace, dev: Dev) -> tuple[Bench, dict[str, int]]:
    """Build the models and inputs (logged); the bench and the parameter counts."""
    t = time.perf_counter()
    rss0 = rss_mb()
    models, n_params = build(args, dev)
    inputs = build_inputs(args.size, models["unet"].config.cross_attention_dim, args.seed)
    source = inputs["image"].to(dev.device)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, args.size), torch.linspace(0, 1, args.size), indexing="ij")
    reference = torch.stack([0.5 + 0.5 * torch.cos(9 * xx), yy, 1 - xx])[None].to(dev.device)
    neg = TextCond(inputs["caption"].to(dev.device))
    pos = TextCond((inputs["caption"] + inputs["delta"]).to(dev.device))
    den = DiffusersDenoiser(models["unet"], scheduler_config=SCHEDULER)
    z0 = encode_latents(models["vae"], source).to(dev.device)
    grid = sampling_grid(den, GRID_STEPS).to(dev.device)
    k = start_index(grid)
    trim()
    out(
        f"built models in {time.perf_counter() - t:.1f}s: "
        + ", ".join(f"{n} {v / 1e6:.1f}M" for n, v in n_params.items())
        + f" params; RSS {rss0:.0f} -> {rss_mb():.0f} MB; start sigma {float(grid[k]):.3f} "
        f"(grid index {k} of {GRID_STEPS}: a full run = {GRID_STEPS - k} steps + 9 resampling repeats)"
    )
    inp = StepInputs(den, z0, neg, pos, args.cfg, args.seed, dev)
    decoders = {"b": Decoder(models["vae"], dev), "c": Decoder(models["taesd"], dev)}
    bench = Bench(inp, models, source, reference, grid, k, decoders, ForwardTimer(models["dino"], dev))
    return bench, n_params


def result_skeleton(args: argparse.Namespace, bench: Bench, n_params: dict[str, int]) -> dict[str, Any]:
    """The result's configuration and environment, with empty phases and parts."""
    keys = ("size", "steps", "repeats", "mode", "cfg", "dino_size", "threads", "seed")
    config = {"kind": args.kind, **{k: getattr(args, k) for k in keys}, "device": args.where, "dtype": args.dtype}
    config.update(grid_steps=GRID_STEPS, start_index=bench.k, start_sigma=float(bench.grid[bench.k]), params=n_params)
    env = environment()
    env.pop("diffusers", None)
    try:
        import diffusers
        import transformers

        env.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
        if args.gpu:
            env["gpu"] = torch.cuda.get_device_name()
    except Exception:  # noqa: BLE001
        pass
    return {"config": config, "env": env, "phases": {}, "parts_s": {}}


def run_rounds(args: argparse.Namespace, bench: Bench, res: dict[str, Any]) -> None:
    """Rounds of one step per phase, interleaved a, b, c: a change of load on a shared machine hits all phases
    alike. Each step starts from the same noised latent; the terms (and their cached source features) are
    kept across rounds, as across the steps of one run."""
    which = [ph for ph in ("a", "b", "c") if ph in args.phases]
    terms = {ph: () if ph == "a" else bench.terms(ph, args) for ph in which}
    one = bench.grid[: bench.k + 2]  # diffuseit_sample starts at index k: exactly one step
    runs: dict[str, list[dict[str, Any]]] = {ph: [] for ph in which}
    loads = [os.getloadavg()[0]]
    for r in range(args.steps + 1):
        for ph in which:
            out(f"{PHASES[ph]}, {'first step (warm-up)' if r == 0 else f'step {r} of {args.steps}'} ...")
            runs[ph].append(sampler_step(bench.inp, one, terms[ph]))
        loads.append(os.getloadavg()[0])
    for ph in which:
        res["phases"][ph] = {**summarise(runs[ph]), "loadavg": [min(loads), max(loads)]}


def run_breakdown(args: argparse.Namespace, bench: Bench, res: dict[str, Any]) -> None:
    """The parts of one guided step per decoder, repeats interleaved so that a change of load hits both alike."""
    z0, k = bench.inp.z0, bench.k
    s, s_next = bench.grid[k], bench.grid[k + 1]
    g = torch.Generator().manual_seed(args.seed)
    x = z0 + s * torch.randn(z0.shape, generator=g).to(z0)
    which = [ph for ph in ("b", "c") if ph in args.phases]
    terms = {ph: bench.terms(ph, args) for ph in which}
    raw: dict[str, dict[str, list[Clock]]] = {ph: {} for ph in which}
    load0 = os.getloadavg()[0]
    for r in range(args.repeats):
        for ph in which:
            out(f"breakdown {PHASES[ph]}, repeat {r + 1} of {args.repeats} ...")
            timers = (bench.decoders[ph], bench.dino_timer)
            got = step_parts(bench.inp, x, (s, s_next), terms[ph], timers, 1, r == 0)
            for key, v in got.items():
                raw[ph].setdefault(key, []).extend(v)
    res["parts_s"] = {ph: {key: med_clock(v) for key, v in raw[ph].items()} for ph in which}
    res["parts_loadavg"] = [load0, os.getloadavg()[0]]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    dev = Dev(args.gpu, dtype)
    out(
        f"bench_diffuseit: {args.kind} models, {args.size}x{args.size}, {args.mode}-guided, {args.steps} steps/phase, "
        f"{args.where} {args.dtype}, {args.threads} threads, torch {torch.__version__}, "
        f"load {os.getloadavg()[0]:.2f}"
    )
    bench, n_params = setup(args, dev)
    res = result_skeleton(args, bench, n_params)
    run_rounds(args, bench, res)
    if not args.no_breakdown:
        run_breakdown(args, bench, res)
    if args.profile:
        res["profile_top_ops"] = {}
        for ph in ("b", "c"):
            if ph in args.phases:
                out(f"profiling {PHASES[ph]} ...")
                res["profile_top_ops"][ph] = profile_step(bench.inp, bench.grid, bench.terms(ph, args))
    bench.dino_timer.close()
    bench.inp.den.close()
    res["env"]["loadavg_end"] = os.getloadavg()
    report(res)
    for ph, table in res.get("profile_top_ops", {}).items():
        out(f"\ntorch.profiler, one guided step, {PHASES[ph]}:")
        out(table)
    write_result(res, args.out, f"bench_diffuseit-{args.kind}-{args.where}-{args.size}-{args.mode}")
    return 0


def phase_table(ph: dict[str, Any], gpu: bool) -> None:
    """One row per phase: median wall / CPU seconds per step, the first step, peak memory, added memory, load."""
    mem_col = "peak CUDA MB" if gpu else "peak RSS MB"
    out(
        f"\nphase                          wall s/step  CPU s/step  first step wall s  {mem_col:>12}  peak added MB  load"
    )
    for k, name in PHASES.items():
        if k not in ph:
            continue
        p = ph[k]
        peak = p.get("peak_rss_mb", p.get("peak_alloc_mb"))
        flag = "" if p["finite"] else "  (NaN/Inf output!)"
        out(
            f"{name:<30} {p['step_median_s']:>11.3f} {p['step_median_cpu_s']:>11.3f} {p['first_step_s']:>18.3f}  "
            f"{peak:>12.0f}  {p['peak_added_mb']:>13.0f}  {p['loadavg'][0]:.1f}-{p['loadavg'][1]:.1f}{flag}"
        )


RATIO_PAIRS = [("b", "a"), ("c", "a"), ("c", "b")]


def phase_ratios(ph: dict[str, Any]) -> dict[str, float]:
    """Step time (wall, CPU) and peak added memory of (b) and (c) over (a), and of (c) over (b)."""
    ratios: dict[str, float] = {}
    for num, den in RATIO_PAIRS:
        if num in ph and den in ph:
            ratios[f"time_{num}_over_{den}_wall"] = ph[num]["step_median_s"] / ph[den]["step_median_s"]
            ratios[f"time_{num}_over_{den}_cpu"] = ph[num]["step_median_cpu_s"] / max(
                ph[den]["step_median_cpu_s"], 1e-9
            )
            ratios[f"mem_{num}_over_{den}"] = ph[num]["peak_added_mb"] / max(ph[den]["peak_added_mb"], 1e-9)
    if ratios:
        out("\nratio per step                 wall time   CPU time   peak added memory")
        for num, den in RATIO_PAIRS:
            if f"mem_{num}_over_{den}" in ratios:
                out(
                    f"  ({num}) / ({den})                    {ratios[f'time_{num}_over_{den}_wall']:>7.2f}    "
                    f"{ratios[f'time_{num}_over_{den}_cpu']:>7.2f}    {ratios[f'mem_{num}_over_{den}']:>7.2f}"
                )
    return ratios


def parts_table(parts: dict[str, Any], plain: float | None, key: str) -> dict[str, dict[str, float]]:
    """Each part's wall / CPU seconds, share of the step and multiple of the plain step; the per-decoder totals."""
    cols = [c for c in ("b", "c") if c in parts]
    out(
        f"\none guided step, part by part (median); share and 'x plain' ({key} time) = multiple of the plain step (a)"
        + (f" = {plain:.3f} {key} s" if plain else "")
    )
    out(f"  {'part':<14}" + "".join(f"{PHASES[c][4:]:>42}" for c in cols))
    out(f"  {'':<14}" + f"{'wall s':>12}{'CPU s':>9}{'share':>10}{'x plain':>11}" * len(cols))
    names = list(parts[cols[0]])
    totals = {c: {t: sum(parts[c][n][t] for n in names) for t in ("wall", "cpu")} for c in cols}
    for name in [*names, "sum"]:
        row = f"  {name:<14}"
        for c in cols:
            v = totals[c] if name == "sum" else parts[c][name]
            share = v[key] / max(totals[c][key], 1e-12)
            row += f"{v['wall']:>12.3f}{v['cpu']:>9.2f}{share:>10.1%}" + (
                f"{v[key] / plain:>10.2f}x" if plain else " " * 11
            )
        out(row)
    return totals


PART_GROUPS = {
    "UNet fwd+bwd (grad pass)": ("unet_fwd_grad", "unet_bwd"),
    "decoder fwd+bwd": ("decode_fwd", "decode_bwd"),
    "DINO fwd+bwd + losses": ("dino_fwd", "dino_bwd", "losses"),
    "CFG fwd (the DDIM step)": ("cfg_fwd",),
}


def report(res: dict[str, Any]) -> None:
    """Print the tables; adds ``ratios`` and ``parts_grouped`` to ``res``. Shares and multiples use CPU seconds
    on the CPU (robust to other processes on a shared machine) and wall seconds on CUDA."""
    ph = res["phases"]
    gpu = res["config"]["device"] == "cuda"
    key = "wall" if gpu else "cpu"
    phase_table(ph, gpu)
    res["ratios"] = phase_ratios(ph)
    parts = res.get("parts_s", {})
    if not parts:
        return
    plain = ph.get("a", {}).get("step_median_s" if gpu else "step_median_cpu_s")
    totals = parts_table(parts, plain, key)
    res["parts_grouped"] = {}
    for c in totals:
        got = {
            g: {t: sum(parts[c][n][t] for n in members) for t in ("wall", "cpu")} for g, members in PART_GROUPS.items()
        }
        res["parts_grouped"][c] = got
        out(
            f"  {PHASES[c]} ({key} time): "
            + "; ".join(f"{g} {v[key]:.2f} s ({v[key] / totals[c][key]:.0%})" for g, v in got.items())
        )


if __name__ == "__main__":
    sys.exit(main())
