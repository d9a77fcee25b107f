"""``edit --model`` in each form a user has: a single-file checkpoint (ComfyUI/models/checkpoints), a Hugging Face
model id (the default when ``--model`` is left out; the download function is a fake serving a tiny folder), a
diffusers folder (tests/core/test_cli.py); and the errors offline with nothing local. Tiny random models only."""

from __future__ import annotations

import logging

import pytest

from zerocon_core.diffusers_host import cli, sd_models

from .test_cli import _args, _check_png
from .test_sd_models_single_file import configs_only
from .tiny import tiny_sd_folder, write_png
from .tiny_checkpoint import write_checkpoint


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(diffusers folder, checkpoint file of the same weights, configs-only folder)."""
    root = tmp_path_factory.mktemp("cli-models")
    folder = tiny_sd_folder(root / "sd")
    parts = sd_models.load_folder(folder)
    (root / "checkpoints").mkdir()
    ckpt = write_checkpoint(root / "checkpoints" / "tiny.safetensors", parts.unet, parts.vae, parts.text_encoder)
    return folder, ckpt, configs_only(folder, root / "configs")


@pytest.fixture()
def png(tmp_path):
    return write_png(tmp_path / "in.png")


def _without_model(argv: list[str]) -> list[str]:
    i = argv.index("--model")
    return argv[:i] + argv[i + 2 :]


def test_checkpoint_file_with_model_config(models, png, tmp_path, monkeypatch, caplog):
    """The checkpoint ComfyUI users have, fully offline; the output equals the diffusers folder's (same weights)."""
    folder, ckpt, configs = models
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sd_models, "_snapshot_download", lambda *a, **k: pytest.fail("no hub call expected"))
    with caplog.at_level(logging.INFO, logger="zerocon"):
        assert cli.main(_args(ckpt, png, tmp_path / "a.png", "--caption", "a cat", "--model-config", str(configs))) == 0
    assert f"loaded SD1.x model from {ckpt}" in caplog.text
    assert cli.main(_args(folder, png, tmp_path / "b.png", "--caption", "a cat")) == 0
    assert (_check_png(tmp_path / "a.png") == _check_png(tmp_path / "b.png")).all()


def test_default_model_is_a_hub_id(models, png, tmp_path, monkeypatch, caplog):
    folder = models[0]
    calls = []

    def fake(repo_id, **kwargs):
        calls.append(repo_id)
        return str(folder)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # cached: no network needed
    monkeypatch.setattr(sd_models, "_snapshot_download", fake)
    argv = _without_model(_args(folder, png, tmp_path / "o.png", "--caption", "a cat"))
    with caplog.at_level(logging.INFO, logger="zerocon"):
        assert cli.main(argv) == 0
    _check_png(tmp_path / "o.png")
    assert set(calls) == {sd_models.DEFAULT_MODEL} and f"from {sd_models.DEFAULT_MODEL}" in caplog.text


def test_offline_with_nothing_local(models, png, tmp_path, monkeypatch, capsys):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def not_cached(repo_id, **kwargs):
        raise LocalEntryNotFoundError("not cached")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sd_models, "_snapshot_download", not_cached)
    argv = _without_model(_args(models[0], png, tmp_path / "o.png", "--caption", "a cat"))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"the files of model {sd_models.DEFAULT_MODEL} are not on this machine" in err
    assert "ComfyUI/models/checkpoints/<name>.safetensors" in err
    # a checkpoint without local configs: the error names the configs and --model-config
    assert cli.main(_args(models[1], png, tmp_path / "o.png", "--caption", "a cat")) == 2
    err = capsys.readouterr().err
    assert "the configs of SD1.x models" in err and "--model-config DIR" in err
    assert not (tmp_path / "o.png").exists()


def test_bad_model_arguments(models, png, tmp_path, capsys):
    out = tmp_path / "o.png"
    argv = _args(tmp_path / "missing.ckpt", png, out, "--caption", "a cat")
    assert cli.main(argv) == 2 and "model file not found" in capsys.readouterr().err
    argv = _args(models[1], png, out, "--caption", "a cat", "--model-config", str(tmp_path / "nope"))
    assert cli.main(argv) == 2 and "--model-config folder not found" in capsys.readouterr().err
    assert not out.exists()
