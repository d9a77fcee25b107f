"""What the benchmarks share: the repository and ComfyUI paths, printing, the result file, the process's
environment, the calibration scripts' options, inputs and probe table, and starting ComfyUI on the CPU.

Imported by the scripts in this folder as ``common`` (their folder is first on ``sys.path``); torch and
ComfyUI are imported inside the functions that need them, so ComfyUI's options can be set first.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "bench" / "out"
COMFYUI = Path(os.environ.get("COMFYUI_PATH", str(Path.home() / "ComfyUI"))).expanduser().resolve()


def out(text: str = "") -> None:
    """One line on stdout, flushed (progress of a long run shows at once)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def environment() -> dict[str, Any]:
    """torch / Python / machine / CPU count / load average now, and the diffusers version where installed."""
    import torch

    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
    }
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except Exception:  # noqa: BLE001
        pass
    return env


def write_json(path: str | os.PathLike, result: Any, indent: int = 2, **dump: Any) -> Path:
    """Write ``result`` as indented JSON to ``path`` (its folder made); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=indent, **dump))
    return path


def write_result(res: dict[str, Any], path: str | None, stem: str) -> Path:
    """Write a benchmark's result to ``path`` (None: ``bench/out/<stem>-<date-time>.json``) and say where."""
    target = Path(path) if path else OUT_DIR / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json(target, res, default=float)
    out(f"\nwrote {target}")
    return target


# ---------------------------------------------------------------------------------------------------------
# calibration scripts


def calibration_parser(doc: str, steps: int, out_name: str) -> argparse.ArgumentParser:
    """``--size``, ``--steps``, ``--threads`` and ``--out`` (``bench/out/<out_name>``) of a calibration script."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (latent = size/8)")
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(OUT_DIR / out_name))
    return ap


def random_edit(seed: int, size: int, device: str) -> tuple[Any, Any, Any]:
    """``(latent (1, 4, size/8, size/8), source TextCond, edit TextCond)``: random, the edit 0.3 off the source."""
    import torch

    from zerocon_core.diffusers_host.denoiser import TextCond

    g = torch.Generator().manual_seed(seed)
    h = size // 8
    latent = torch.randn(1, 4, h, h, generator=g).to(device)
    src = TextCond(torch.randn(1, 77, 768, generator=g).to(device))
    edit = TextCond(src.embeds + 0.3 * torch.randn(1, 77, 768, generator=g).to(device))
    return latent, src, edit


def grad_record(ctx: Any, losses: tuple[Any, Any], scale: float = 1.0) -> dict[str, Any]:
    """One probe row: the step, sigma, the two losses and the RMS of their gradients w.r.t. ``ctx.x`` (x ``scale``)."""
    import torch

    g_xa, g_nce = (torch.autograd.grad(v, ctx.x, retain_graph=True)[0] for v in losses)
    rms = [float(g.pow(2).mean().sqrt()) * scale for g in (g_xa, g_nce)]
    return {
        "step": ctx.step,
        "sigma": float(ctx.sigma),
        "loss_xa": float(losses[0].detach()),
        "loss_nce": float(losses[1].detach()),
        "rms_grad_xa": rms[0],
        "rms_grad_nce": rms[1],
    }


def equal_pull(records: list[dict[str, Any]], xa_weight: float) -> tuple[float, float]:
    """``(median rms ratio xa / nce, the PatchNCE weight that pulls as hard as cross-attention at xa_weight)``."""
    ratio = statistics.median(r["rms_grad_xa"] / max(r["rms_grad_nce"], 1e-30) for r in records)
    return ratio, xa_weight * ratio


def probe_lines(result: dict[str, Any], out_path: str) -> list[str]:
    """The per-step table and the verdict of a PatchNCE calibration ``result``."""
    lines = [f"{'step':>4} {'sigma':>8} {'L_xa':>10} {'L_nce':>8} {'rms dL_xa':>10} {'rms dL_nce':>10}"]
    for r in result["per_step"]:
        lines.append(
            f"{r['step']:>4} {r['sigma']:8.3f} {r['loss_xa']:10.4g} {r['loss_nce']:8.4f} "
            f"{r['rms_grad_xa']:10.3g} {r['rms_grad_nce']:10.3g}"
        )
    lines.append(
        f"median rms ratio xa/nce = {result['median_ratio_xa_over_nce']:.4g}; PatchNCE weight for equal "
        f"pull with xa weight {result['xa_weight']}: {result['equal_pull_nce_weight']:.4g} "
        f"(shipped default {result['current_nce_default']})"
    )
    lines.append(f"wrote {out_path} in {result['seconds']:.0f} s")
    return lines


# ---------------------------------------------------------------------------------------------------------
# ComfyUI


def start_comfyui(threads: int) -> None:
    """Put ComfyUI (``COMFYUI_PATH``) on the path, on the CPU, with ``threads`` torch threads."""
    sys.path.insert(0, str(COMFYUI))
    from comfy.cli_args import args as cargs

    cargs.cpu = True
    import torch

    torch.set_num_threads(threads)


def pack_loader() -> Callable[[str], Any]:
    """The ComfyUI tests' ``pack_module``: loads this checkout's pack the way ComfyUI does."""
    sys.path.insert(0, str(REPO / "tests" / "comfyui"))
    from conftest import pack_module

    return pack_module


def load_pack(*modules: str) -> tuple:
    """Load this checkout's pack the way ComfyUI loads a custom node folder (a package named after its path,
    dots replaced) and import ``modules``, dotted names inside it."""
    name = str(REPO).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return tuple(importlib.import_module(f"{name}.{m}") for m in modules)
