"""bench/sweep.py --piebench: PIE-Bench entries -> edit options, PIE-Bench's table per setting, and the same
numbers as ``eval --piebench`` on the images it saved."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from zerocon_core.diffusers_host import cli
from zerocon_core.evaluation import piebench

from .tiny import tiny_sd_folder
from .tiny_vision import random_image, tiny_clip_metric_folder, tiny_dino_folder, write_png

REPO = Path(__file__).resolve().parents[2]
S = 64  # tiny VAE size; masks decode at the image's size (PIE-Bench's own images are 512 x 512)


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("zerocon_bench_sweep_pie", REPO / "bench" / "sweep.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _bench(root: Path) -> Path:
    entries = {
        "000000000001": {
            "image_path": "0_random_140/000000000001.jpg",
            "original_prompt": "a cat sitting on a [red] sofa",
            "editing_prompt": "a cat sitting on a [blue] sofa",
            "editing_instruction": "make the sofa blue",
            "editing_type_id": "0",
            "blended_word": "sofa sofa",
            "mask": [v for r in range(20, 40) for v in (r * S + 10, 30)],
        },
        "611000000002": {
            "image_path": "6_change_attribute_color_40/1_artificial/1_animal/611000000002.jpg",
            "original_prompt": "a [white] horse in a field",
            "editing_prompt": "a [brown] horse in a field",
            "editing_instruction": "make the horse brown",
            "editing_type_id": "6",
            "blended_word": "horse horse",
            "mask": [S * 30, S * 10],
        },
    }
    data = root / "data"
    for i, e in enumerate(entries.values()):
        write_png(random_image(i, S, S), data / "annotation_images" / e["image_path"])
    (data / "mapping_file.json").write_text(json.dumps(entries))
    return data / "mapping_file.json"


def test_entries_become_edit_options(tmp_path, sweep, monkeypatch, capsys):
    """Caption = original prompt, direction = editing prompt minus it (brackets gone); blended words unused."""
    mapping = _bench(tmp_path)
    seen = []

    def fake(pipe, image, options, settings, progress=False):
        seen.append(options)
        out = {s.name: image.clone() for s in settings}
        return out, {k: 0.0 for k in out}

    monkeypatch.setattr(sweep, "sweep_image", fake)
    items = sweep.piebench_items(mapping, categories=["6"])
    assert [i.id for i in items] == ["611000000002"]
    paths = sweep.run_sweep(None, None, tmp_path / "out", [0.1], [0.0], items=items, pie=True, branches="both")
    (opt,) = seen
    assert opt.caption == "a white horse in a field" and opt.target_prompt == "a brown horse in a field"
    assert opt.source is None and opt.target is None and opt.branches == "both"
    rows = list(csv.DictReader(open(paths["csv"])))
    assert list(rows[0])[6:] == list(piebench.METRICS)
    assert rows[0]["image"] == "images/xa0.1_nce0/6_change_attribute_color_40/1_artificial/1_animal/611000000002.png"
    # an unedited image: background MSE 0, PSNR inf
    assert float(rows[0]["mse_x1e4"]) == 0.0 and rows[0]["psnr"] == "inf"
    assert "| xa0.1_nce0 | 1 |" in capsys.readouterr().out


def test_bad_piebench_sweep_arguments(tmp_path, sweep, capsys):
    mapping = _bench(tmp_path)
    base = ["--model", str(tmp_path), "--out-dir", str(tmp_path / "o")]
    assert sweep.main(["--manifest", "m.csv", "--limit", "1"] + base) == 2
    assert capsys.readouterr().err.strip().endswith("--limit only go with --piebench")
    assert sweep.main(["--piebench", str(mapping), "--images", str(tmp_path / "nope")] + base) == 2
    assert "PIE-Bench source image folder not found" in capsys.readouterr().err
    assert sweep.main(["--piebench", str(mapping), "--categories", "9"] + base) == 2
    assert "no entry of editing type(s) ['9']" in capsys.readouterr().err


def test_piebench_sweep_matches_eval_on_its_images(tmp_path, sweep, capsys):
    mapping = _bench(tmp_path)
    model = tiny_sd_folder(tmp_path / "sd")
    clip = tiny_clip_metric_folder(tmp_path / "clip")
    dino = tiny_dino_folder(tmp_path / "dino")
    out = tmp_path / "out"
    argv = ["--piebench", str(mapping), "--model", str(model), "--out-dir", str(out), "--xa", "0,0.1", "--nce", "0"]
    argv += ["--clip", str(clip), "--dino", str(dino), "--steps", "2", "--num-sentences", "2"]
    assert sweep.main(argv + ["--device", "cpu", "--dtype", "float32"]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith("| Method | n | Structure distance x1e3 | PSNR |")
    assert [line.split("|")[1].strip() for line in table[2:]] == ["reconstruction", "xa0_nce0", "xa0.1_nce0"]
    assert (out / "piebench_table.md").read_text().strip().splitlines() == table
    rows = [r for r in csv.DictReader(open(out / "sweep.csv")) if r["setting"] == "xa0.1_nce0"]
    assert len(rows) == 2
    # eval on the saved folder: the same numbers (the sweep scores the 8-bit image it saves)
    result = tmp_path / "eval.csv"
    code = cli.main(
        ["eval", "-q", "--piebench", str(mapping), "--edited", str(out / "images" / "xa0.1_nce0"), "--out", str(result)]
        + ["--clip", str(clip), "--dino", str(dino), "--no-progress", "--device", "cpu"]
    )
    assert code == 0
    scored = {r["key"]: r for r in csv.DictReader(open(result))}
    for r in rows:
        for k in piebench.METRICS:
            if k == "lpips_x1e3":
                assert r[k] == scored[r["id"]][k] == "nan"
                continue
            assert float(r[k]) == pytest.approx(float(scored[r["id"]][k]), rel=1e-6), (r["id"], k)
