"""bench/sweep.py on tiny random models: the grid runs, is scored, and gives a CSV and a valid PNG plot."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import pytest

from .tiny import tiny_sd_folder
from .tiny_vision import random_image, tiny_clip_metric_folder, tiny_dino_folder, write_png

REPO = Path(__file__).resolve().parents[2]


def _load_sweep():
    spec = importlib.util.spec_from_file_location("zerocon_bench_sweep", REPO / "bench" / "sweep.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def sweep():
    return _load_sweep()


def test_sweep_on_tiny_models(tmp_path, sweep):
    from PIL import Image

    model = tiny_sd_folder(tmp_path / "sd")
    clip = tiny_clip_metric_folder(tmp_path / "clip")
    dino = tiny_dino_folder(tmp_path / "dino")
    write_png(random_image(0, 64, 64), tmp_path / "a.png")
    write_png(random_image(1, 56, 64), tmp_path / "b.png")  # not a multiple of 8 in height: resized and restored
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "id,source,source_text,target_text\n"
        "cat,a.png,a photo of a cat,a photo of a dog\n"
        "horse,b.png,a horse in the grass,a zebra in the grass\n"
        "gone,missing.png,a cat,a dog\n"
    )
    out = tmp_path / "out"
    code = sweep.main(
        [
            "--manifest",
            str(manifest),
            "--model",
            str(model),
            "--out-dir",
            str(out),
            "--xa",
            "0,0.1",
            "--nce",
            "0,0.05",
            "--clip",
            str(clip),
            "--dino",
            str(dino),
            "--steps",
            "3",
            "--device",
            "cpu",
            "--dtype",
            "float32",
        ]
    )
    assert code == 0
    with open(out / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    settings = ["xa0_nce0", "xa0.1_nce0", "xa0_nce0.05", "xa0.1_nce0.05"]
    assert sorted({r["setting"] for r in rows}) == sorted(settings + ["reconstruction"])
    assert len(rows) == 2 * 5 and {r["id"] for r in rows} == {"cat", "horse"}
    for r in rows:
        assert (out / r["image"]).is_file()
        for k in ("clip_score", "clip_accuracy", "structure_distance", "bg_ssim", "bg_mse"):
            assert math.isfinite(float(r[k])), (r["setting"], k)
    with Image.open(out / "images" / "horse_xa0_nce0.png") as im:
        assert im.size == (64, 56)
    # guidance changes the result: the guided settings differ from the unguided one
    cat = {r["setting"]: r for r in rows if r["id"] == "cat"}
    assert cat["xa0.1_nce0"]["structure_distance"] != cat["xa0_nce0"]["structure_distance"]

    with open(out / "sweep_summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert [s["setting"] for s in summary] == ["reconstruction"] + settings
    assert all(s["n"] == "2" for s in summary)

    with Image.open(out / "sweep.png") as im:
        im.verify()
    with Image.open(out / "sweep.png") as im:
        assert im.format == "PNG" and im.size == (900, 640)
        assert len(im.convert("RGB").getcolors(1 << 20)) > 5  # not a blank canvas


def test_plot_handles_missing_metrics(tmp_path, sweep):
    from PIL import Image

    summary = [
        {
            "setting": "xa0_nce0",
            "xa_weight": 0.0,
            "nce_weight": 0.0,
            "structure_distance": math.nan,
            "clip_score": math.nan,
        }
    ]
    path = sweep.plot_tradeoff(summary, tmp_path / "p.png")
    with Image.open(path) as im:
        im.verify()


def test_parse_grid_and_ticks(sweep):
    assert sweep.parse_grid("0, 0.05,0.1,0.05") == [0.0, 0.05, 0.1]
    with pytest.raises(ValueError):
        sweep.parse_grid("-1")
    ticks = sweep._nice_ticks(0.013, 0.087)
    assert ticks[0] <= 0.013 and ticks[-1] >= 0.087 and len(ticks) <= 8
    assert len(sweep._nice_ticks(1.0, 1.0)) >= 2
