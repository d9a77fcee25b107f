"""Benchmark: a Flux sentence-bank edit direction through ComfyClipEncoder (batched) vs CLIP Text Encode of each
sentence one by one (what a user would otherwise chain), on a small random Flux CLIP built from ComfyUI's own
classes (tests/comfyui/tiny_clip.py: CLIP-L 32 wide; T5 4096 wide with --t5-layers layers of --t5-ff, padded to
256 tokens). Both are timed in ONE process, alternately; the directions are compared.

    COMFYUI_PATH=~/ComfyUI <comfy-python> bench/bench_direction_t5.py --sentences 64 --batch 16

Prints wall and CPU seconds per side and their ratios. No weights are downloaded.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import COMFYUI, REPO  # noqa: E402, F401


def load_pack():
    """The pack's direction nodes and core direction module, loaded as ComfyUI loads the pack."""
    return common.load_pack("nodes.direction_nodes", "zerocon_core.direction")


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentences", type=int, default=64, help="sentences per side")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--t5-layers", type=int, default=2)
    ap.add_argument("--t5-ff", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)

    sys.path.insert(0, str(COMFYUI))
    sys.path.insert(0, str(REPO / "tests" / "comfyui"))
    from comfy.cli_args import args as cargs

    cargs.cpu = True
    import torch

    torch.set_num_threads(args.threads)
    import tiny_clip

    dn, zdir = load_pack()
    clip = tiny_clip.flux_clip(seed=0, t5_layers=args.t5_layers, t5_ff=args.t5_ff)
    src = zdir.template_sentences("cat", args.sentences)
    tgt = zdir.template_sentences("dog", args.sentences)

    def batched():
        with torch.inference_mode():
            return zdir.sentence_bank_direction(dn.ComfyClipEncoder(clip), src, tgt, batch_size=args.batch).delta

    def one_by_one():
        def mean(texts):
            total = None
            for t in texts:
                with torch.inference_mode():
                    c = clip.encode_from_tokens(clip.tokenize(t))[0, :256].double()
                total = c if total is None else total + c
            return total / len(texts)

        return mean(tgt) - mean(src)

    rows = {"batched": [], "one by one": []}
    for _ in range(args.repeats):
        d_b, wb, cb = timed(batched)
        d_o, wo, co = timed(one_by_one)
        rows["batched"].append((wb, cb))
        rows["one by one"].append((wo, co))
    err = (d_b.double() - d_o).abs().max().item()
    lines = [
        f"Flux CLIP, T5 {args.t5_layers} layers x d_ff {args.t5_ff}, {args.sentences} sentences per side, "
        f"batch {args.batch}, {args.threads} threads; max |direction difference| {err:.2e}"
    ]
    best = {k: min(v) for k, v in rows.items()}
    lines += [f"{k:>11}: wall {w:7.2f} s  cpu {c:7.2f} s" for k, (w, c) in best.items()]
    (wb, cb), (wo, co) = best["batched"], best["one by one"]
    lines.append(f"one by one / batched: wall {wo / wb:.2f} x, cpu {co / cb:.2f} x")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
