"""``eval --piebench``: PIE-Bench's mapping_file.json, its RLE masks, its table's columns and units; LPIPS loading."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from zerocon_core.common.images import load_image
from zerocon_core.diffuseit.dino import load_dino
from zerocon_core.diffusers_host import cli
from zerocon_core.evaluation import evaluate, metrics, piebench
from zerocon_core.evaluation.lpips import CHANNELS, check_lpips_folder, load_lpips, lpips_distance

from .tiny_vision import random_image, tiny_clip_metric_folder, tiny_dino_folder

H = W = 512


# ---------------------------------------------------------------------------------------------------------
# RLE decoding, against masks drawn by hand

# A 6 x 10 image: a 2 x 3 rectangle (rows 1-2, cols 1-3) and an L (col 7, rows 2-4, then row 4, cols 7-9).
DRAWN = """
..........
.###......
.###...#..
.......#..
.......###
..........
"""
# Row-major runs (start = row * 10 + col, length), written by hand from the drawing above.
DRAWN_RLE = [11, 3, 21, 3, 27, 1, 37, 1, 47, 3]


def _grid(text: str) -> np.ndarray:
    return np.array([[c == "#" for c in line] for line in text.strip().splitlines()])


def test_rle_decodes_hand_drawn_shapes_pixel_by_pixel():
    got = piebench.decode_mask(DRAWN_RLE, 6, 10, border=False)
    want = _grid(DRAWN)
    assert got.shape == (6, 10) and got.dtype == bool
    for r in range(6):
        for c in range(10):
            assert got[r, c] == want[r, c], (r, c)
    # column-major decoding would draw another picture: the test tells the two orders apart
    col_major = np.zeros(60, bool)
    for s, n in zip(DRAWN_RLE[::2], DRAWN_RLE[1::2]):
        col_major[s : s + n] = True
    assert not np.array_equal(col_major.reshape(10, 6).T, want)


def test_rle_border_is_marked_edited_and_long_runs_stop_at_the_end():
    got = piebench.decode_mask(DRAWN_RLE, 6, 10)  # PIE-Bench's default: the 1-pixel frame counts as edited
    want = _grid(DRAWN)
    want[0, :] = want[-1, :] = want[:, 0] = want[:, -1] = True
    assert np.array_equal(got, want)
    # a run from (5, 5) of 100 pixels stops at the last pixel (PIE-Bench clips it)
    tail = piebench.decode_mask([55, 100], 6, 10, border=False)
    assert tail.sum() == 5 and tail[5, 5:].all()
    assert not piebench.decode_mask([], 6, 10, border=False).any()


def test_rle_at_512_rectangle():
    # rows 100..119, cols 200..249: one run per row, start = row * 512 + 200
    rle = []
    for r in range(100, 120):
        rle += [r * 512 + 200, 50]
    got = piebench.decode_mask(rle)
    want = np.zeros((512, 512), bool)
    want[100:120, 200:250] = True
    want[0, :] = want[-1, :] = want[:, 0] = want[:, -1] = True
    assert np.array_equal(got, want)


@pytest.mark.parametrize(
    "rle, message",
    [
        ("1 2", "the mask must be a list [start, length, start, length, ...], got str"),
        ([1, 2, 3], "the mask has 3 numbers; it needs (start, length) pairs, an even count"),
        ([1, -2], "the mask must hold non-negative integers, got -2"),
        ([1.5, 2], "the mask must hold non-negative integers, got 1.5"),
        ([True, 2], "the mask must hold non-negative integers, got True"),
    ],
)
def test_malformed_rle(rle, message):
    with pytest.raises(ValueError) as exc:
        piebench.decode_mask(rle, 6, 10)
    assert message in str(exc.value)


def test_rle_for_another_size():
    with pytest.raises(ValueError, match=r"mask run 1 starts at pixel 60, past the last pixel of a 10x6 image \(59\)"):
        piebench.decode_mask([0, 1, 60, 2], 6, 10)


def test_strip_brackets():
    assert piebench.strip_brackets("a slanted [rusty] mountain bicycle") == "a slanted rusty mountain bicycle"


# ---------------------------------------------------------------------------------------------------------
# A three-entry PIE-Bench set in the benchmark's exact format


def _rect_rle(r0, r1, c0, c1):
    rle = []
    for r in range(r0, r1):
        rle += [r * W + c0, c1 - c0]
    return rle


ENTRIES = {
    "000000000000": {
        "image_path": "0_random_140/000000000000.jpg",
        "original_prompt": "a slanted mountain bicycle on the road in front of a building",
        "editing_prompt": "a slanted [rusty] mountain bicycle on the road in front of a building",
        "editing_instruction": "Make the frame of the bike rusty",
        "editing_type_id": "0",
        "blended_word": "bicycle bicycle",
        "mask": _rect_rle(150, 300, 100, 400),
    },
    "111000000000": {
        "image_path": "1_change_object_80/1_artificial/1_animal/111000000000.jpg",
        "original_prompt": "a [cat] sitting on a wooden chair",
        "editing_prompt": "a [dog] sitting on a wooden chair",
        "editing_instruction": "Change the cat to a dog",
        "editing_type_id": "1",
        "blended_word": "cat dog",
        # an L: a vertical bar (rows 50..399, cols 60..119) and a foot (rows 340..399, cols 120..299)
        "mask": _rect_rle(50, 340, 60, 120) + [v for r in range(340, 400) for v in (r * W + 60, 240)],
    },
    "222000000000": {
        "image_path": "2_add_object_80/1_artificial/1_animal/222000000000.jpg",
        "original_prompt": "a white plate on a table",
        "editing_prompt": "a white plate with [flowers] on a table",
        "editing_instruction": "Add flowers",
        "editing_type_id": "2",
        "blended_word": "plate plate",
        "mask": [],  # only PIE-Bench's border counts as edited
    },
}


def _mask_np(key):
    m = np.zeros((H, W))
    if key == "000000000000":
        m[150:300, 100:400] = 1
    elif key == "111000000000":
        m[50:400, 60:120] = 1
        m[340:400, 60:300] = 1
    m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = 1
    return m


def _to_u8(img: torch.Tensor) -> np.ndarray:
    return (img[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """data/mapping_file.json + data/annotation_images (JPEG sources); two methods' edits: ``ours`` as PNGs
    (our sweep's layout), ``output/ddim+p2p/annotation_images`` as PnPInversion's 4-panel JPEG strips."""
    root = tmp_path_factory.mktemp("pie")
    data = root / "data"
    data.mkdir()
    (data / "mapping_file.json").write_text(json.dumps(ENTRIES, indent=1))
    for i, (key, e) in enumerate(ENTRIES.items()):
        src = random_image(i, H, W)
        p = data / "annotation_images" / e["image_path"]
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_to_u8(src)).save(p, quality=95)
        m = torch.from_numpy(_mask_np(key)).float()
        ours = (src * (1 - m) + random_image(50 + i, H, W) * m + 0.03 * (random_image(80 + i, H, W) - 0.5)).clamp(0, 1)
        q = root / "ours" / e["image_path"]
        q.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_to_u8(ours)).save(q.with_suffix(".png"))
        theirs = (0.8 * src + 0.2 * random_image(90 + i, H, W)).clamp(0, 1)
        strip = np.concatenate([np.full((H, W, 3), 255, np.uint8), _to_u8(src), _to_u8(src), _to_u8(theirs)], 1)
        t = root / "output" / "ddim+p2p" / "annotation_images" / e["image_path"]
        t.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(strip).save(t, quality=95)
    models = root / "models"
    folders = {"clip": tiny_clip_metric_folder(models / "clip"), "dino": tiny_dino_folder(models / "dino")}
    folders["lpips"] = _lpips_folder(models / "lpips")
    return {
        "root": root,
        "mapping": data / "mapping_file.json",
        "ours": root / "ours",
        "theirs": root / "output" / "ddim+p2p" / "annotation_images",
        **folders,
        "loaded": {
            "clip": metrics.load_clip_metric(folders["clip"]),
            "dino": load_dino(folders["dino"]),
            "lpips": load_lpips(folders["lpips"]),
        },
    }


def _read_u8(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0


def _reference(bench, key, method):
    """Every PIE-Bench column of one edit, computed here: numpy float64 for MSE / PSNR / masking, the
    (separately tested) metric functions for the model-based scores."""
    e = ENTRIES[key]
    src = _read_u8(bench["mapping"].parent / "annotation_images" / e["image_path"])
    if method == "ours":
        edit = _read_u8((bench["ours"] / e["image_path"]).with_suffix(".png"))
    else:
        edit = _read_u8(bench["theirs"] / e["image_path"])[:, -W:]  # the strip's last panel
    m = _mask_np(key)[..., None]
    s_bg, e_bg = src * (1 - m), edit * (1 - m)
    mse = ((s_bg - e_bg) ** 2).mean()
    t = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].float()  # noqa: E731
    clip, dino, lp = (bench["loaded"][k] for k in ("clip", "dino", "lpips"))
    prompt = piebench.strip_brackets(e["editing_prompt"])
    return {
        "structure_distance_x1e3": 1e3 * float(metrics.structure_distance(dino, t(src), t(edit), pixel_scale=255)[0]),
        "psnr": 10 * math.log10(1 / mse),
        "lpips_x1e3": 1e3 * float(lpips_distance(lp, t(s_bg), t(e_bg))[0]),
        "mse_x1e4": 1e4 * mse,
        "ssim_x1e2": 1e2 * float(metrics.ssim_map(t(s_bg).double(), t(e_bg).double()).mean()),
        "clip_whole": float(metrics.clip_score(clip, t(edit), prompt)[0]),
        "clip_edited": float(metrics.clip_score(clip, t(edit * m), prompt)[0]),
    }


def _run(bench, out, *extra):
    argv = ["eval", "-q", "--piebench", str(bench["mapping"]), "--out", str(out), "--no-progress"]
    return cli.main(argv + list(extra))


def test_piebench_table_columns_units_and_values(bench, tmp_path, capsys):
    out = tmp_path / "pie.csv"
    code = _run(
        bench,
        out,
        "--edited",
        f"ours={bench['ours']}",
        str(bench["theirs"]),
        "--clip",
        str(bench["clip"]),
        "--dino",
        str(bench["dino"]),
        "--lpips",
        str(bench["lpips"]),
    )
    assert code == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0] == (
        "| Method | n | Structure distance x1e3 | PSNR | LPIPS x1e3 | MSE x1e4 | SSIM x1e2 | CLIP Whole | CLIP Edited |"
    )
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["key"]) for r in rows] == [(m, k) for m in ("ours", "ddim+p2p") for k in ENTRIES]
    assert all(r["status"] == "ok" for r in rows), [r["message"] for r in rows]
    for r in rows:
        ref = _reference(bench, r["key"], r["method"])
        for k, v in ref.items():
            assert float(r[k]) == pytest.approx(v, rel=2e-5, abs=1e-6), (r["method"], r["key"], k)
    # the printed table: one row per method, the means of its rows at 2 decimals
    for line, method in zip(table[2:], ("ours", "ddim+p2p")):
        cells = [c.strip() for c in line.strip("|").split("|")]
        mine = [r for r in rows if r["method"] == method]
        assert cells[:2] == [method, "3"]
        want = [f"{np.mean([float(r[k]) for r in mine]):.2f}" for k in piebench.METRICS]
        assert cells[2:] == want
    # the units are PIE-Bench's: e.g. MSE x1e4 is 10^4 times numpy's masked-frame MSE
    r0 = rows[0]
    assert 1 < float(r0["mse_x1e4"]) < 1e4 and 0 < float(r0["ssim_x1e2"]) <= 100
    summary = list(csv.DictReader(open(evaluate.summary_path(out))))
    assert {(s["method"], s["metric"]) for s in summary} == {
        (m, k) for m in ("ours", "ddim+p2p") for k in piebench.METRICS
    }


def test_pie_conventions_are_what_the_reference_checks(bench):
    """The reference above would catch the alternatives: our own background convention, 0..1 DINO input,
    the bracketed prompt and an unmasked 'Edited' CLIP all give other numbers."""
    key = "000000000000"
    e = ENTRIES[key]
    src = load_image(bench["mapping"].parent / "annotation_images" / e["image_path"])
    edit = load_image((bench["ours"] / e["image_path"]).with_suffix(".png"))
    m = torch.from_numpy(_mask_np(key)).float()
    pie = piebench.score_pair(src, edit, m.numpy() > 0, piebench.strip_brackets(e["editing_prompt"]))
    assert pie["mse_x1e4"] != pytest.approx(1e4 * float(metrics.background_mse(src, edit, m)[0]), rel=1e-3)
    dino = bench["loaded"]["dino"]
    assert float(metrics.structure_distance(dino, src, edit, 255)[0]) != pytest.approx(
        float(metrics.structure_distance(dino, src, edit, 1)[0]), rel=1e-3
    )
    clip = bench["loaded"]["clip"]
    with_brackets = float(metrics.clip_score(clip, edit, e["editing_prompt"])[0])
    assert with_brackets != pytest.approx(float(metrics.clip_score(clip, edit, e["original_prompt"])[0]), rel=1e-4)
    whole = float(metrics.clip_score(clip, edit, "x")[0])
    assert whole != pytest.approx(float(metrics.clip_edited_region(clip, edit, "x", m)[0]), rel=1e-4)


def test_categories_resume_and_missing_images(bench, tmp_path, capsys):
    out = tmp_path / "pie.csv"
    assert _run(bench, out, "--edited", f"ours={bench['ours']}", "--categories", "1", "2") == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["key"] for r in rows] == ["111000000000", "222000000000"]
    assert rows[0]["clip_whole"] == "nan" and rows[0]["lpips_x1e3"] == "nan"  # no --clip / --lpips
    line = capsys.readouterr().out.strip().splitlines()[2]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] == "-" and cells[4] == "-" and cells[-1] == "-" and cells[3] != "-"
    # rerun: nothing rescored, the new category appended
    assert _run(bench, out, "--edited", f"ours={bench['ours']}") == 0
    with open(out, newline="") as f:
        rows2 = list(csv.DictReader(f))
    assert rows2[:2] == rows and [r["key"] for r in rows2[2:]] == ["000000000000"]
    # an edit folder without some edits: those rows say which files were looked for
    partial = tmp_path / "partial"
    target = partial / ENTRIES["000000000000"]["image_path"]
    target.parent.mkdir(parents=True)
    shutil.copy((bench["ours"] / ENTRIES["000000000000"]["image_path"]).with_suffix(".png"), target.with_suffix(".png"))
    out2 = tmp_path / "partial.csv"
    assert _run(bench, out2, "--edited", f"p={partial}") == 0
    with open(out2, newline="") as f:
        rows3 = {r["key"]: r for r in csv.DictReader(f)}
    assert rows3["000000000000"]["status"] == "ok"
    gone = rows3["111000000000"]
    path = partial / ENTRIES["111000000000"]["image_path"]
    assert gone["status"] == "missing"
    assert gone["message"] == f"file not found: edited {path} or {path.with_suffix('.png')}"


def _write_mapping(tmp_path, entries) -> Path:
    data = tmp_path / "data"
    (data / "annotation_images").mkdir(parents=True, exist_ok=True)
    p = data / "mapping_file.json"
    p.write_text(entries if isinstance(entries, str) else json.dumps(entries))
    return p


def _error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_annotation_files(tmp_path, capsys):
    out = str(tmp_path / "o.csv")
    edited = tmp_path / "edits"
    edited.mkdir()

    def run(entries):
        p = _write_mapping(tmp_path, entries)
        return cli.main(["eval", "--piebench", str(p), "--edited", str(edited), "--out", out]), p

    entry = dict(ENTRIES["000000000000"])
    del entry["mask"]
    code, p = run({"k1": entry})
    assert code == 2
    assert _error(capsys) == f"python -m zerocon_core eval: error: {p}, entry 'k1': missing field(s) ['mask']"
    code, p = run({"k2": dict(ENTRIES["000000000000"], mask=[5, 6, 7])})
    assert code == 2
    assert "entry 'k2': the mask has 3 numbers; it needs (start, length) pairs, an even count" in _error(capsys)
    code, p = run({"k3": dict(ENTRIES["000000000000"], mask="RLE")})
    assert code == 2 and "entry 'k3': the mask must be a list" in _error(capsys)
    code, p = run([ENTRIES["000000000000"]])
    assert code == 2 and "expected a JSON object mapping each key to its annotation" in _error(capsys)
    code, p = run("{not json")
    assert code == 2 and f"{p}: not valid JSON" in _error(capsys)
    code, p = run({"k4": ENTRIES["000000000000"]})
    code = cli.main(["eval", "--piebench", str(p), "--edited", str(edited), "--out", out, "--categories", "7"])
    assert code == 2 and _error(capsys).endswith(f"{p}: no entry of editing type(s) ['7']")
    code = cli.main(["eval", "--piebench", str(tmp_path / "none.json"), "--edited", str(edited), "--out", out])
    assert code == 2 and _error(capsys).endswith(f"PIE-Bench annotation file not found: {tmp_path / 'none.json'}")


def test_bad_command_lines(tmp_path, capsys):
    p = _write_mapping(tmp_path, {"k": ENTRIES["000000000000"]})
    out = str(tmp_path / "o.csv")
    assert cli.main(["eval", "--piebench", str(p), "--out", out]) == 2
    assert _error(capsys).endswith("--piebench needs --edited: the folder(s) of edited images to score")
    assert cli.main(["eval", "--piebench", str(p), "--edited", str(tmp_path / "nope"), "--out", out]) == 2
    assert _error(capsys).endswith(f"edited image folder of method 'nope' not found: {tmp_path / 'nope'}")
    assert cli.main(["eval", "--piebench", str(p), "--edited", str(tmp_path), "--images", "x", "--out", out]) == 2
    assert _error(capsys).endswith("PIE-Bench source image folder not found: x (give --images)")
    assert cli.main(["eval", "--piebench", str(p), "--edited", f"a={tmp_path}", f"a={tmp_path}", "--out", out]) == 2
    assert _error(capsys).endswith("--edited: method name 'a' given twice; name them NAME=DIR")
    assert cli.main(["eval", "--manifest", "m.csv", "--edited", "d", "--lpips", "l", "--out", out]) == 2
    assert _error(capsys).endswith("--edited, --lpips only go with --piebench")
    assert cli.main(["eval", "--out", out]) == 2
    assert "one of the arguments --manifest --piebench is required" in capsys.readouterr().err
    code = cli.main(["eval", "--piebench", str(p), "--edited", str(tmp_path), "--lpips", str(tmp_path), "--out", out])
    assert code == 2 and f"LPIPS model folder {tmp_path} lacks squeezenet1_1*.pth" in _error(capsys)


def test_unreadable_source_and_mask_of_another_size(tmp_path):
    e = dict(ENTRIES["000000000000"])
    p = _write_mapping(tmp_path, {"big": dict(e, mask=[600 * 600, 3]), "bad": dict(e, image_path="x/bad.jpg")})
    images = p.parent / "annotation_images"
    (images / e["image_path"]).parent.mkdir(parents=True)
    Image.fromarray(_to_u8(random_image(0, 64, 64))).save(images / e["image_path"])
    (images / "x").mkdir()
    (images / "x" / "bad.jpg").write_text("not an image")
    edits = tmp_path / "edits"
    for rel in (e["image_path"], "x/bad.jpg"):
        (edits / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_to_u8(random_image(1, 64, 64))).save((edits / rel).with_suffix(".png"))
    out = tmp_path / "o.csv"
    evaluate.evaluate_piebench(p, {"m": edits}, out, progress=False)
    rows = {r["key"]: r for r in csv.DictReader(open(out))}
    assert rows["big"]["status"] == "error"
    assert "mask run 0 starts at pixel 360000, past the last pixel of a 64x64 image (4095)" in rows["big"]["message"]
    assert rows["bad"]["status"] == "error" and "cannot read" in rows["bad"]["message"]
    # the settings object and the old positions give the same file
    for i, call in enumerate(
        (
            dict(run=evaluate.PieBenchRun(images=images, progress=False)),
            dict(args=(images, None, None, None, None, False)),
        )
    ):
        again = tmp_path / f"again{i}.csv"
        evaluate.evaluate_piebench(p, {"m": edits}, again, *call.get("args", ()), run=call.get("run"))
        assert again.read_text() == out.read_text()
    with pytest.raises(TypeError, match="unexpected keyword argument 'image_folder'"):
        evaluate.evaluate_piebench(p, {"m": edits}, out, image_folder=images)


def test_parse_methods():
    m = evaluate.parse_methods(["a=x/y", "out/ddim+p2p/annotation_images", "z/ours"])
    assert list(m) == ["a", "ddim+p2p", "ours"]
    assert m["a"] == Path("x/y")


# ---------------------------------------------------------------------------------------------------------
# LPIPS (SqueezeNet) from a local folder: torchvision's and lpips' file layouts, checked against a functional
# float64 forward written out here


def _random_lpips_weights(seed: int = 0) -> tuple[dict, dict]:
    """Random weights under torchvision's SqueezeNet 1.1 keys and lpips' ``linK.model.1.weight`` keys."""
    g = torch.Generator().manual_seed(seed)
    fires = {3: (64, 16, 64), 4: (128, 16, 64), 6: (128, 32, 128), 7: (256, 32, 128)}
    fires.update({9: (256, 48, 192), 10: (384, 48, 192), 11: (384, 64, 256), 12: (512, 64, 256)})

    def conv(cout, cin, k):
        return (
            torch.randn(cout, cin, k, k, generator=g) * (2 / (cin * k * k)) ** 0.5,
            0.1 * torch.randn(cout, generator=g),
        )

    trunk = {}
    trunk["features.0.weight"], trunk["features.0.bias"] = conv(64, 3, 3)
    for i, (cin, sq, ex) in fires.items():
        for name, (co, ci, k) in {"squeeze": (sq, cin, 1), "expand1x1": (ex, sq, 1), "expand3x3": (ex, sq, 3)}.items():
            trunk[f"features.{i}.{name}.weight"], trunk[f"features.{i}.{name}.bias"] = conv(co, ci, k)
    trunk["classifier.1.weight"], trunk["classifier.1.bias"] = conv(1000, 512, 1)
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(CHANNELS)}
    return trunk, lin


def _lpips_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    trunk, lin = _random_lpips_weights()
    torch.save(trunk, folder / "squeezenet1_1-b8a52dc0.pth")
    torch.save(lin, folder / "squeeze.pth")
    return folder


def _ref_lpips(trunk, lin, x, y):
    """LPIPS v0.1 / SqueezeNet 1.1, written out functionally in float64 (x, y in [-1, 1])."""
    d = {k: v.double() for k, v in trunk.items()}
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)

    def fire(h, i):
        s = F.relu(F.conv2d(h, d[f"features.{i}.squeeze.weight"], d[f"features.{i}.squeeze.bias"]))
        a = F.relu(F.conv2d(s, d[f"features.{i}.expand1x1.weight"], d[f"features.{i}.expand1x1.bias"]))
        b = F.relu(F.conv2d(s, d[f"features.{i}.expand3x3.weight"], d[f"features.{i}.expand3x3.bias"], padding=1))
        return torch.cat([a, b], 1)

    def pool(h):
        return F.max_pool2d(h, 3, 2, ceil_mode=True)

    def feats(z):
        h = F.relu(F.conv2d((z.double() - shift) / scale, d["features.0.weight"], d["features.0.bias"], stride=2))
        out = [h]
        h = fire(fire(pool(h), 3), 4)
        out.append(h)
        h = fire(fire(pool(h), 6), 7)
        out.append(h)
        for i in (9, 10, 11, 12):
            h = fire(pool(h) if i == 9 else h, i)
            out.append(h)
        return out

    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for k, (a, b) in enumerate(zip(feats(x), feats(y))):
        na = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        nb = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        w = lin[f"lin{k}.model.1.weight"].double().view(1, -1, 1, 1)
        total += (((na - nb) ** 2) * w).sum(1).mean(dim=(1, 2))
    return total


def test_lpips_matches_functional_reference(tmp_path):
    folder = _lpips_folder(tmp_path / "lp")
    trunk, lin = _random_lpips_weights()
    model = load_lpips(folder)
    x, y = random_image(1, 64, 80), random_image(2, 64, 80)
    got = lpips_distance(model, x, y)
    want = _ref_lpips(trunk, lin, x * 2 - 1, y * 2 - 1)
    assert got.shape == (1,) and float(want[0]) > 1e-3
    assert float(got[0]) == pytest.approx(float(want[0]), rel=1e-4)
    assert float(lpips_distance(model, x, x)[0]) == 0.0
    # safetensors files load the same
    from safetensors.torch import save_file

    st = tmp_path / "st"
    st.mkdir()
    save_file(trunk, str(st / "squeezenet1_1.safetensors"))
    save_file(lin, str(st / "squeeze.safetensors"))
    assert float(lpips_distance(load_lpips(st), x, y)[0]) == pytest.approx(float(got[0]), rel=1e-6)


def test_lpips_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="LPIPS model folder not found: .*squeezenet1_1-b8a52dc0.pth"):
        check_lpips_folder(tmp_path / "none")
    folder = tmp_path / "lp"
    folder.mkdir()
    trunk, lin = _random_lpips_weights()
    torch.save(lin, folder / "squeeze.pth")
    with pytest.raises(FileNotFoundError, match=r"lacks squeezenet1_1\*\.pth \(or \.safetensors\); put"):
        load_lpips(folder)
    torch.save({k: v for k, v in trunk.items() if "features.12" not in k}, folder / "squeezenet1_1.pth")
    with pytest.raises(ValueError, match=r"lack 6 tensor\(s\), e.g. \['features.12.expand1x1.bias'"):
        load_lpips(folder)
    torch.save(dict(trunk, **{"features.0.weight": torch.zeros(64, 3, 5, 5)}), folder / "squeezenet1_1.pth")
    with pytest.raises(ValueError, match=r"features.0.weight has shape \(64, 3, 5, 5\), expected \(64, 3, 3, 3\)"):
        load_lpips(folder)
    (folder / "squeezenet1_1.pth").write_text("junk")
    with pytest.raises(ValueError, match="cannot read LPIPS weights"):
        load_lpips(folder)
