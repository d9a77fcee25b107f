"""End to end: ``python -m zerocon_core edit`` on a tiny random diffusers-layout model folder written by the test.

No hub, no downloaded weights: UNet/VAE/CLIP are random tiny models saved with ``save_pretrained``, the
tokenizer is written by ``tiny_text``. The input PNG is 44x36 (W x H), not a multiple of 8: the CLI warns,
works at 48x40 and writes an output of the input's size.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from zerocon_core.diffusers_host import cli
from zerocon_core.method.sampler import AUTO_STEP_SIZE

from .tiny import PNG_H, PNG_W, tiny_sd_folder
from .tiny_text import tiny_blip_folder

W, H = PNG_W, PNG_H
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    return tiny_sd_folder(tmp_path_factory.mktemp("models") / "sd-tiny")


@pytest.fixture(scope="module")
def vpred_dir(tmp_path_factory) -> Path:
    return tiny_sd_folder(tmp_path_factory.mktemp("models") / "sd-tiny-v", "v_prediction")


def _edit(model: Path, image: Path, out: Path, *rest: str) -> list[str]:
    """``zerocon edit`` on ``image`` with ``model``, writing ``out``, then ``rest``."""
    return ["edit", "--image", str(image), "--model", str(model), "--out", str(out), *rest]


def _args(model: Path, image: Path, out: Path, *extra: str) -> list[str]:
    return _edit(
        model,
        image,
        out,
        "--source",
        "cat",
        "--target",
        "dog",
        "--num-sentences",
        "6",
        "--steps",
        "2",
        "--device",
        "cpu",
        *extra,
    )


def _check_png(path: Path) -> np.ndarray:
    from PIL import Image

    assert path.is_file()
    with Image.open(path) as im:
        assert im.size == (W, H) and im.mode == "RGB"
        arr = np.asarray(im).astype(np.float64)
    assert np.isfinite(arr).all()
    return arr


# -- CLI end to end ---------------------------------------------------------------------------------------------


def test_cli_edit_in_process(model_dir, png, tmp_path, capsys, caplog):
    out = tmp_path / "out.png"
    direction = tmp_path / "cat2dog.safetensors"
    with caplog.at_level(logging.INFO, logger="zerocon"):
        code = cli.main(
            _args(
                model_dir,
                png,
                out,
                "--caption",
                "a photo of a cat on the grass",
                "--save-direction",
                str(direction),
                "--nce-weight",
                "0.05",
            )
        )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    arr = _check_png(out)
    assert arr.std() > 0
    assert direction.is_file()
    # the human summary: caption and the timing table
    assert "caption:   a photo of a cat on the grass" in captured.out
    for stage in ("load", "caption", "direction", "encode", "inversion", "sampling", "decode", "total"):
        assert f"\n{stage}" in captured.out, stage
    # the log: size warning, caption, timings
    assert "not a multiple of 8" in caplog.text
    assert "caption: a photo of a cat on the grass" in caplog.text
    assert "timings (s):" in caplog.text and "sampling" in caplog.text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_saved_direction_and_target_prompt(model_dir, png, tmp_path, capsys):
    d = tmp_path / "d.safetensors"
    assert (
        cli.main(
            _args(model_dir, png, tmp_path / "a.png", "--caption", "a cat", "--save-direction", str(d), "--seed", "3")
        )
        == 0
    )
    # loading the saved direction reproduces the edit exactly
    assert (
        cli.main(_args(model_dir, png, tmp_path / "b.png", "--caption", "a cat", "--direction", str(d), "--seed", "3"))
        == 0
    )
    np.testing.assert_array_equal(_check_png(tmp_path / "a.png"), _check_png(tmp_path / "b.png"))
    # prompt difference, no regularisation, both CFG halves guided
    assert (
        cli.main(
            _edit(
                model_dir,
                png,
                tmp_path / "c.png",
                "--caption",
                "a cat",
                "--target-prompt",
                "a dog",
                "--steps",
                "2",
                "--no-regularization",
                "--branches",
                "both",
                "--device",
                "cpu",
            )
        )
        == 0
    )
    _check_png(tmp_path / "c.png")
    assert "'a cat' -> 'a dog' (prompt" in capsys.readouterr().out


def test_cli_sentence_files_and_blip(model_dir, png, tmp_path, capsys):
    src, tgt = tmp_path / "src.txt", tmp_path / "tgt.txt"
    src.write_text("# cats\na cat on a couch\na cat in the grass\n\n")
    tgt.write_text("a dog on a couch\na dog in the grass\n")
    blip = tiny_blip_folder(tmp_path / "blip")
    out = tmp_path / "out.jpg"
    code = cli.main(
        _edit(
            model_dir,
            png,
            out,
            "--source-sentences",
            str(src),
            "--target-sentences",
            str(tgt),
            "--blip",
            str(blip),
            "--caption-min-tokens",
            "2",
            "--steps",
            "2",
            "--device",
            "cpu",
        )
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    _check_png(out)
    assert "2/2 sentences" in captured.out
    caption_line = next(line for line in captured.out.splitlines() if line.startswith("caption:"))
    assert caption_line.split(":", 1)[1].strip()  # BLIP gave a non-empty caption


def test_cli_v_prediction(vpred_dir, png, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="zerocon"):
        assert cli.main(_args(vpred_dir, png, tmp_path / "v.png", "--caption", "a cat", "--step-mode", "raw")) == 0
    _check_png(tmp_path / "v.png")
    assert "v-prediction" in caplog.text
    # the one auto-weight rule, raw mode: every term a tenth of its eps default (as the nodes resolve it)
    assert "guidance (step mode raw): CrossAttentionGuidance(weight=0.01), PatchNCEGuidance(weight=0.05)" in caplog.text


def test_cli_sdxl(tmp_path, png, caplog, capsys):
    model = tiny_sd_folder(tmp_path / "sdxl-tiny", sdxl=True)
    with caplog.at_level(logging.INFO, logger="zerocon"):
        assert cli.main(_args(model, png, tmp_path / "xl.png", "--caption", "a cat", "--target-prompt", "a dog")) == 0
    _check_png(tmp_path / "xl.png")
    assert "loaded SDXL model" in caplog.text
    # the default: step mode auto, the auto weights are the ratios 1 / 1; the summary is printed
    assert "guidance (step mode auto): CrossAttentionGuidance(weight=1), PatchNCEGuidance(weight=1)" in caplog.text
    guidance_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("guidance:"))
    assert f"steps (step mode auto); mean update {100 * AUTO_STEP_SIZE:.1f}% of the latent RMS" in guidance_line


def test_cli_subprocess(model_dir, png, tmp_path):
    out = tmp_path / "sub.png"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "zerocon_core", *_args(model_dir, png, out, "--caption", "a cat", "--no-progress")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    _check_png(out)
    assert "caption:   a cat" in proc.stdout and "where the time went" in proc.stdout
    assert "inversion" in proc.stdout and "sampling" in proc.stdout
    assert "not a multiple of 8" in proc.stderr and "timings (s)" in proc.stderr


# -- bad input ----------------------------------------------------------------------------------------------------


def _run_error(argv, capsys) -> str:
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in captured.err
    return captured.err


def test_missing_model_folder(png, tmp_path, capsys):
    out = tmp_path / "out.png"
    err = _run_error(_args(tmp_path / "no-such-model", png, out, "--caption", "a cat"), capsys)
    assert "model folder not found" in err and "no-such-model" in err
    assert not out.exists() and list(tmp_path.iterdir()) == [png]


def test_incomplete_model_folder(png, tmp_path, capsys):
    broken = tmp_path / "broken"
    (broken / "unet").mkdir(parents=True)
    err = _run_error(_args(broken, png, tmp_path / "out.png", "--caption", "a cat"), capsys)
    assert "incomplete" in err and "vae/" in err and "tokenizer/" in err
    assert not (tmp_path / "out.png").exists()


def test_bad_steps(model_dir, png, tmp_path, capsys):
    for bad in ("0", "-3", "x"):
        argv = _args(model_dir, png, tmp_path / "out.png", "--caption", "a cat")
        argv[argv.index("--steps") + 1] = bad
        err = _run_error(argv, capsys)
        assert "--steps" in err
    assert not (tmp_path / "out.png").exists()


def test_missing_and_bad_image(model_dir, tmp_path, capsys):
    err = _run_error(_args(model_dir, tmp_path / "missing.png", tmp_path / "o.png", "--caption", "a"), capsys)
    assert "image file not found" in err and "missing.png" in err
    bad = tmp_path / "bad.png"
    bad.write_text("definitely not an image")
    err = _run_error(_args(model_dir, bad, tmp_path / "o.png", "--caption", "a"), capsys)
    assert "cannot read" in err and "bad.png" in err
    assert not (tmp_path / "o.png").exists()


def test_other_user_errors(model_dir, png, tmp_path, capsys):
    err = _run_error(_args(model_dir, png, tmp_path / "no-dir" / "o.png", "--caption", "a"), capsys)
    assert "output folder does not exist" in err
    err = _run_error(_args(model_dir, png, tmp_path / "o.png", "--caption", "a", "--strict-size"), capsys)
    assert "not a multiple of 8" in err
    err = _run_error(
        _args(model_dir, png, tmp_path / "o.png", "--caption", "a", "--source-sentences", str(tmp_path / "none.txt")),
        capsys,
    )
    assert "source sentences file not found" in err
    err = _run_error(
        _edit(
            model_dir,
            png,
            tmp_path / "o.png",
            "--caption",
            "a cat",
            "--source",
            "cat",
        ),
        capsys,
    )
    assert "no edit direction" in err
    err = _run_error(_args(model_dir, png, tmp_path / "o.png", "--blip", str(tmp_path / "no-blip")), capsys)
    assert "BLIP" in err and "no-blip" in err
    assert not (tmp_path / "o.png").exists()
