"""Single-file checkpoints (what ComfyUI/models/checkpoints holds): tiny random diffusers models written by the
test in the original LDM key layout, loaded back through diffusers' ``from_single_file`` with the configs from a
configs-only folder, the (mocked) Hugging Face cache, or a (mocked) download. Never the network."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from zerocon_core.diffusers_host import sd_models

from .tiny import tiny_sd_folder
from .tiny_checkpoint import clip_to_ldm, unet_to_ldm, vae_to_ldm, write_checkpoint


def configs_only(folder: Path, dest: Path) -> Path:
    """Copy the configs and tokenizer files of a diffusers folder (no weights) to ``dest``."""
    for p in folder.rglob("*"):
        if p.is_file() and p.suffix in (".json", ".txt"):
            target = dest / p.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, target)
    assert not list(dest.rglob("*.safetensors")) and not list(dest.rglob("*.bin"))
    return dest


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """(original parts, checkpoint .safetensors, checkpoint .ckpt, configs-only folder)."""
    root = tmp_path_factory.mktemp("single-file")
    folder = tiny_sd_folder(root / "sd")
    parts = sd_models.load_folder(folder)
    st = write_checkpoint(root / "tiny-sd15.safetensors", parts.unet, parts.vae, parts.text_encoder)
    ckpt = write_checkpoint(root / "tiny-sd15.ckpt", parts.unet, parts.vae, parts.text_encoder)
    return parts, st, ckpt, configs_only(folder, root / "configs")


@pytest.fixture()
def no_hub(monkeypatch):
    """Offline, and any Hugging Face call fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def trap(*args, **kwargs):
        raise AssertionError(f"unexpected Hugging Face call {args} {kwargs}")

    monkeypatch.setattr(sd_models, "_snapshot_download", trap)


def _same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_writer_is_the_inverse_of_diffusers_converters(sd1):
    """The test's LDM writer, converted back by diffusers' own single-file converters, gives every tensor back."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    parts = sd1[0]
    for model, to_ldm, back in (
        (parts.unet, unet_to_ldm, convert_ldm_unet_checkpoint),
        (parts.vae, vae_to_ldm, convert_ldm_vae_checkpoint),
    ):
        sd = model.state_dict()
        ldm = to_ldm(sd, dict(model.config))
        assert all(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in ldm)
        again = back(ldm, dict(model.config))
        assert set(again) == set(sd)
        assert all(torch.equal(again[k], sd[k]) for k in sd)
    sd = {k: v for k, v in parts.text_encoder.state_dict().items() if not k.endswith("position_ids")}
    again = convert_ldm_clip_checkpoint(clip_to_ldm(sd))
    flat = not any(k.startswith("text_model.") for k in sd)
    again = {k.removeprefix("text_model.") if flat else k: v for k, v in again.items()}
    assert set(again) == set(sd) and all(torch.equal(again[k], sd[k]) for k in sd)


@pytest.mark.parametrize("which", ["safetensors", "ckpt"])
def test_checkpoint_with_local_configs(sd1, which, no_hub):
    parts, st, ckpt, configs = sd1
    path = st if which == "safetensors" else ckpt
    assert sd_models.model_source(path) == sd_models.ModelSource("checkpoint", str(path))
    assert sd_models.checkpoint_type(path) == "v1"
    loaded = sd_models.load_checkpoint(path, config=configs)
    _same_weights(loaded.unet, parts.unet)
    _same_weights(loaded.vae, parts.vae)
    _same_weights(loaded.text_encoder, parts.text_encoder)
    assert loaded.tokenizer("a cat").input_ids == parts.tokenizer("a cat").input_ids
    assert loaded.scheduler_config["prediction_type"] == parts.scheduler_config["prediction_type"] == "epsilon"
    assert loaded.family == "SD1.x" and not loaded.is_sdxl


def test_reference_configs_from_the_cache(sd1, monkeypatch):
    """No --model-config: the configs of the family's reference repository, read from the Hugging Face cache."""
    parts, st, _, configs = sd1
    calls = []

    def fake(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(configs)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sd_models, "_snapshot_download", fake)
    loaded = sd_models.load_checkpoint(st)
    _same_weights(loaded.unet, parts.unet)
    assert calls == [
        (
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            {"allow_patterns": list(sd_models.CONFIG_PATTERNS), "local_files_only": True},
        )
    ]


def _online(monkeypatch):
    from huggingface_hub import constants

    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert not sd_models.hub_offline()


def test_reference_configs_downloaded_once_when_online(sd1, monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    parts, st, _, configs = sd1
    calls = []

    def fake(repo_id, **kwargs):
        calls.append(kwargs.get("local_files_only", False))
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        assert kwargs["allow_patterns"] == list(sd_models.CONFIG_PATTERNS)  # configs only, never weights
        return str(configs)

    _online(monkeypatch)
    monkeypatch.setattr(sd_models, "_snapshot_download", fake)
    loaded = sd_models.load_checkpoint(st)
    _same_weights(loaded.vae, parts.vae)
    assert calls == [True, False]


def test_offline_without_configs_says_what_to_put_where(sd1, monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    _, st, _, _ = sd1

    def fake(repo_id, **kwargs):
        assert kwargs.get("local_files_only") is True, "offline: no download may be tried"
        raise LocalEntryNotFoundError("not cached")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sd_models, "_snapshot_download", fake)
    with pytest.raises(FileNotFoundError) as info:
        sd_models.load_checkpoint(st)
    msg = str(info.value)
    assert msg.startswith(
        "the configs of SD1.x models (stable-diffusion-v1-5/stable-diffusion-v1-5) are not on this machine and "
        "downloads are off (HF_HUB_OFFLINE is set): tiny-sd15.safetensors holds the weights"
    )
    assert "--model-config DIR" in msg
    assert "huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 --include" in msg


def test_config_folder_without_model_index(sd1, tmp_path, no_hub):
    with pytest.raises(FileNotFoundError, match="has no model_index.json"):
        sd_models.load_checkpoint(sd1[1], config=tmp_path)


def test_unsupported_and_unreadable_checkpoints(tmp_path, no_hub):
    from safetensors.torch import save_file

    inpaint = tmp_path / "inpaint.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 9, 3, 3)}, str(inpaint))
    with pytest.raises(ValueError, match="is a 'inpainting' checkpoint; supported: SD1.x, SD2.x and SDXL base"):
        sd_models.checkpoint_type(inpaint)
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0.alpha": torch.ones(())}, str(lora))
    with pytest.raises(ValueError, match="is not a full Stable Diffusion checkpoint"):
        sd_models.checkpoint_type(lora)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint .*junk.ckpt"):
        sd_models.checkpoint_type(junk)


def test_sd2_prediction_type_rule(tmp_path):
    """SD2 768-v and SD2-base share one architecture: the norm bias spread decides (population std > 0.09)."""
    from safetensors.torch import save_file

    key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    for spread, expected in ((0.2, "v_prediction"), (0.05, "epsilon")):
        bias = torch.linspace(-1, 1, 64, dtype=torch.float64)
        bias = bias / bias.pow(2).mean().sqrt() * spread  # population std = spread (zero mean)
        path = tmp_path / f"sd2-{spread}.safetensors"
        save_file({key: bias.float()}, str(path))
        assert sd_models.sd2_prediction_type(path) == expected
    save_file({"model.diffusion_model.out.0.bias": torch.zeros(4)}, str(tmp_path / "none.safetensors"))
    assert sd_models.sd2_prediction_type(tmp_path / "none.safetensors") == "epsilon"


def write_tiny_sdxl_folder(folder: Path) -> Path:
    """A tiny SDXL diffusers folder whose checkpoint diffusers recognises as SDXL base: the two text encoders have
    different widths (12 + 20 = the UNet's 32) and the OpenCLIP one has 10 layers (diffusers looks for layer 9)."""
    import json

    from .tiny_text import tiny_clip

    tiny_sd_folder(folder, sdxl=True)
    tiny_clip(folder / "tokenizer", hidden=12)[1].save_pretrained(folder / "text_encoder")
    te2 = tiny_clip(folder / "tokenizer_2", hidden=20, layers=10, projection=16, pad_token="!", seed=1)[1]
    te2.save_pretrained(folder / "text_encoder_2")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(
        _class_name="StableDiffusionXLPipeline",
        text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
        tokenizer_2=["transformers", "CLIPTokenizer"],
    )
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_sdxl_checkpoint_with_reference_configs(tmp_path, monkeypatch):
    folder = write_tiny_sdxl_folder(tmp_path / "sdxl")
    parts = sd_models.load_folder(folder)
    path = write_checkpoint(
        tmp_path / "tiny-sdxl.safetensors", parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2
    )
    configs = configs_only(folder, tmp_path / "configs")
    repos = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sd_models, "_snapshot_download", lambda repo, **kw: repos.append(repo) or str(configs))
    assert sd_models.checkpoint_type(path) == "xl_base"
    loaded = sd_models.load_checkpoint(path)
    assert repos == ["stabilityai/stable-diffusion-xl-base-1.0"]
    assert loaded.is_sdxl and loaded.family == "SDXL"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _same_weights(getattr(loaded, name), getattr(parts, name))
    assert loaded.tokenizer_2.pad_token == "!"
