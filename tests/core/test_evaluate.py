"""``python -m zerocon_core.evaluation.evaluate``: manifest -> per-image CSV + summary; resumable after a real kill."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from zerocon_core.common.images import load_image
from zerocon_core.diffuseit import dino
from zerocon_core.evaluation import evaluate, metrics

from .tiny_vision import random_image, tiny_clip_metric_folder, tiny_dino_folder, write_png

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return tiny_clip_metric_folder(root / "clip"), tiny_dino_folder(root / "dino")


def _write_set(root: Path, n: int = 4, missing: bool = True) -> Path:
    """n (source, edited) PNG pairs (32x32; one edited at 48x48; masks on two rows) + a manifest CSV."""
    rows = []
    for i in range(n):
        write_png(random_image(i, 32, 32), root / f"src{i}.png")
        size = 48 if i == 1 else 32
        edited = (random_image(i, size, size) * 0.7 + 0.3 * random_image(100 + i, size, size)).clamp(0, 1)
        write_png(edited, root / f"edit{i}.png")
        mask = ""
        if i % 2 == 0:
            m = torch.zeros(32, 32)
            m[8:20, 10:24] = 1.0
            write_png(m, root / f"mask{i}.png")
            mask = f"mask{i}.png"
        rows.append(
            {
                "id": f"img{i}",
                "source": f"src{i}.png",
                "edited": f"edit{i}.png",
                "mask": mask,
                "source_text": "a photo of a cat",
                "target_text": "a photo of a dog",
            }
        )
    if missing:
        rows.insert(
            2,
            {
                "id": "gone",
                "source": "src0.png",
                "edited": "nope.png",
                "mask": "",
                "source_text": "a cat",
                "target_text": "a dog",
            },
        )
    path = root / "manifest.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_eval_in_process(tmp_path, models, caplog):
    clip_dir, dino_dir = models
    manifest = _write_set(tmp_path)
    out = tmp_path / "scores.csv"
    with caplog.at_level(logging.WARNING, logger="zerocon"):
        code = evaluate.main([*_inputs(manifest, out, models), "--no-progress", "--device", "cpu"])
    assert code == 0
    rows = _rows(out)
    assert [r["id"] for r in rows] == ["img0", "img1", "gone", "img2", "img3"]
    assert tuple(rows[0]) == evaluate.COLUMNS
    gone = rows[2]
    assert gone["status"] == "missing" and "nope.png" in gone["message"] and gone["bg_psnr"] == "nan"
    assert "row gone skipped" in caplog.text
    assert "resizing the edited image" in caplog.text  # img1 is 48x48 against a 32x32 source
    assert all(r["status"] == "ok" for r in rows if r["id"] != "gone")

    # every value is what metrics.edit_metrics gives on the same files
    clip = metrics.load_clip_metric(clip_dir)
    dino_model = dino.load_dino(dino_dir)
    for r in rows:
        if r["id"] == "gone":
            continue
        mask = evaluate.load_mask(tmp_path / r["mask"]) if r["mask"] else None
        want = metrics.edit_metrics(
            load_image(tmp_path / r["source"]),
            load_image(tmp_path / r["edited"]),
            r["source_text"],
            r["target_text"],
            mask=mask,
            clip=clip,
            dino=dino_model,
        )
        for k in metrics.METRIC_NAMES:
            assert float(r[k]) == pytest.approx(float(want[k][0]), rel=1e-6, abs=1e-9), (r["id"], k)

    summary = _rows(evaluate.summary_path(out))
    assert [s["metric"] for s in summary] == list(metrics.METRIC_NAMES)
    psnr = next(s for s in summary if s["metric"] == "bg_psnr")
    values = [float(r["bg_psnr"]) for r in rows if r["status"] == "ok"]
    assert int(psnr["n"]) == 4
    assert float(psnr["mean"]) == pytest.approx(sum(values) / 4)
    assert float(psnr["ci95_low"]) <= float(psnr["mean"]) <= float(psnr["ci95_high"])

    # a rerun has nothing to do and changes nothing
    before = out.read_text()
    assert evaluate.main(["--manifest", str(manifest), "--out", str(out), "--no-progress", "-q"]) == 0
    assert out.read_text() == before


def _inputs(manifest, out, models) -> list[str]:
    """The evaluation's manifest, output and model arguments."""
    clip_dir, dino_dir = models
    return ["--manifest", str(manifest), "--out", str(out), "--clip", str(clip_dir), "--dino", str(dino_dir)]


def _cmd(manifest, out, models, *extra):
    return [
        sys.executable,
        "-m",
        "zerocon_core.evaluation.evaluate",
        *_inputs(manifest, out, models),
        "--device",
        "cpu",
        "--no-progress",
        "-q",
        *extra,
    ]


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def test_killed_and_resumed_equals_uninterrupted(tmp_path, models):
    manifest = _write_set(tmp_path)
    full = tmp_path / "full.csv"
    subprocess.run(_cmd(manifest, full, models), check=True, env=_env(), cwd=REPO, timeout=300)
    assert len(_rows(full)) == 5

    # a real kill: SIGKILL once two rows are on disk (rows are 1 s apart, so it lands mid-run)
    part = tmp_path / "part.csv"
    proc = subprocess.Popen(
        _cmd(manifest, part, models, "--row-delay", "1"),
        env=_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if part.is_file() and part.read_text().count("\n") >= 3:  # header + 2 rows
                break
            if proc.poll() is not None:
                pytest.fail(f"evaluate exited early: {proc.stderr.read().decode()}")
            time.sleep(0.05)
        else:
            pytest.fail("no rows written in time")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    done = _rows(part)
    assert 2 <= len(done) < 5, "the kill did not land mid-run"
    assert not evaluate.summary_path(part).exists()

    subprocess.run(_cmd(manifest, part, models), check=True, env=_env(), cwd=REPO, timeout=300)
    assert part.read_text() == full.read_text()
    assert evaluate.summary_path(part).read_text() == evaluate.summary_path(full).read_text()


def test_torn_last_line_is_dropped_and_recomputed(tmp_path, caplog):
    manifest = _write_set(tmp_path, n=3, missing=False)
    full = tmp_path / "full.csv"
    evaluate.main(["--manifest", str(manifest), "--out", str(full), "--no-progress", "-q"])
    text = full.read_text()
    lines = text.splitlines(keepends=True)
    torn = tmp_path / "torn.csv"
    torn.write_text("".join(lines[:2]) + lines[2][:15])  # header, one row, a third of a row
    with caplog.at_level(logging.WARNING, logger="zerocon"):
        evaluate.main(["--manifest", str(manifest), "--out", str(torn), "--no-progress"])
    assert "incomplete row" in caplog.text
    assert torn.read_text() == text


def test_jsonl_manifest_and_no_models(tmp_path):
    csv_manifest = _write_set(tmp_path, n=2, missing=False)
    records = _rows(csv_manifest)
    jsonl = tmp_path / "manifest.jsonl"
    jsonl.write_text("\n".join(json.dumps({k: v for k, v in r.items() if v != ""}) for r in records) + "\n")
    assert evaluate.read_manifest(jsonl) == evaluate.read_manifest(csv_manifest)
    out = tmp_path / "o.csv"
    evaluate.evaluate_manifest(jsonl, out, progress=False)
    rows = _rows(out)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert all(r["clip_score"] == "nan" and r["structure_distance"] == "nan" for r in rows)
    assert all(math.isfinite(float(r["bg_ssim"])) for r in rows)


def test_bad_inputs(tmp_path, models):
    manifest = _write_set(tmp_path, n=1, missing=False)
    out = tmp_path / "o.csv"
    # missing columns / duplicate ids / no manifest
    bad = tmp_path / "bad.csv"
    bad.write_text("source,edited\na.png,b.png\n")
    with pytest.raises(ValueError, match="source_text"):
        evaluate.read_manifest(bad)
    dup = tmp_path / "dup.jsonl"
    row = {"id": "x", "source": "a", "edited": "b", "source_text": "", "target_text": ""}
    dup.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="duplicate id"):
        evaluate.read_manifest(dup)
    assert evaluate.main(["--manifest", str(tmp_path / "none.csv"), "--out", str(out)]) == 2
    # a missing model folder names the model id, before anything runs
    assert evaluate.main(["--manifest", str(manifest), "--out", str(out), "--dino", str(tmp_path / "nodino")]) == 2
    assert not out.exists()
    with pytest.raises(FileNotFoundError, match="facebook/dino-vitb8"):
        evaluate.run(
            argparse.Namespace(
                manifest=str(manifest),
                out=str(out),
                clip=None,
                dino=str(tmp_path / "x"),
                device="cpu",
                no_progress=True,
                row_delay=0.0,
            )
        )
    # an output with other columns is not resumed into
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="other columns"):
        evaluate.evaluate_manifest(manifest, other, progress=False)
    # a mask of another size: the row is an error, the run goes on
    write_png(torch.zeros(16, 16), tmp_path / "small_mask.png")
    m2 = tmp_path / "m2.csv"
    m2.write_text(
        "source,edited,source_text,target_text,mask\nsrc0.png,edit0.png,a,b,small_mask.png\nsrc0.png,edit0.png,a,b,\n"
    )
    evaluate.evaluate_manifest(m2, tmp_path / "m2_out.csv", progress=False)
    rows = _rows(tmp_path / "m2_out.csv")
    assert rows[0]["status"] == "error" and "mask is 16x16" in rows[0]["message"]
    assert rows[1]["status"] == "ok"


def test_register_adds_eval_subcommand(tmp_path):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    evaluate.register(sub)
    args = parser.parse_args(["eval", "--manifest", "m.csv", "--out", "o.csv", "--clip", "c"])
    assert args.func is evaluate.run and args.clip == "c" and args.dino is None and args.device == "auto"


def test_summary_bootstrap_is_deterministic():
    vals = [0.1, 0.4, 0.35, 0.8, 0.55]
    assert evaluate.bootstrap_ci(vals) == evaluate.bootstrap_ci(vals)
    lo, hi = evaluate.bootstrap_ci(vals)
    assert lo < sum(vals) / 5 < hi
    assert all(math.isnan(v) for v in evaluate.bootstrap_ci([1.0]))


def test_cli_eval_subcommand_matches_evaluate_main(tmp_path):
    """``python -m zerocon_core eval`` (the package CLI) writes the same CSV as ``zerocon_core.evaluation.evaluate``."""
    from zerocon_core.diffusers_host import cli

    manifest = _write_set(tmp_path)
    direct, via_cli = tmp_path / "direct.csv", tmp_path / "cli.csv"
    assert evaluate.main(["--manifest", str(manifest), "--out", str(direct), "--no-progress", "-q"]) == 0
    assert cli.main(["eval", "-q", "--manifest", str(manifest), "--out", str(via_cli), "--no-progress"]) == 0
    assert _rows(via_cli) == _rows(direct)
    assert cli.main(["eval", "-q", "--manifest", str(tmp_path / "none.csv"), "--out", str(via_cli)]) == 2
