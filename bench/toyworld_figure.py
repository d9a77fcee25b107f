"""The README's before/after picture: the first held-out toy-world edits (not picked), drawn source, the
unguided prompt swap and the default ZeroCon edit, on the 3.6 MB model trained here (docs/toyworld.md).

    .venv/bin/python bench/toyworld_figure.py --out docs/toyworld_edits.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))

from toyworld_quality import MODEL, load  # noqa: E402

from zerocon_core.toyworld import edits  # noqa: E402
from zerocon_core.toyworld.methods import RunSettings, run_batch  # noqa: E402
from zerocon_core.toyworld.world import render  # noqa: E402

ROWS = (("source", None), ("prompt swap, no guidance", "prompt-swap"), ("ZeroCon default", "default"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/toyworld_edits.png"))
    ap.add_argument("--edits", type=int, default=6, help="the first N held-out edits (cycling the kinds)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--scale", type=int, default=5, help="nearest-neighbour upscale of the 32 px images")
    args = ap.parse_args(argv)

    pipe = load(MODEL)
    cases = edits.edit_set(args.edits)
    run = RunSettings(steps=args.steps)
    images = {m: run_batch(pipe, cases, m, run) for _, m in ROWS if m}
    images[None] = np.stack([render(c.source)[0] for c in cases])

    side, label_w, head_h = 32 * args.scale, 190, 34
    sheet = Image.new("RGB", (label_w + side * len(cases), head_h + side * len(ROWS)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, case in enumerate(cases):
        attr = edits.KINDS[case.kind]
        text = f"{getattr(case.source, attr)} -> {case.asked}"
        draw.text((label_w + j * side + 6, 10), text, fill="black")
    for i, (label, method) in enumerate(ROWS):
        draw.text((6, head_h + i * side + side // 2 - 6), label, fill="black")
        for j in range(len(cases)):
            tile = (np.clip(images[method][j], 0, 1) * 255).round().astype(np.uint8)
            tile = Image.fromarray(tile).resize((side, side), Image.NEAREST)
            sheet.paste(tile, (label_w + j * side, head_h + i * side))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    sys.stdout.write(f"wrote {args.out}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
