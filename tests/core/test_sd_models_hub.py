"""What ``--model`` names (checkpoint file, diffusers folder, Hugging Face model id), and hub models downloaded
once: the download function is replaced by a fake that serves a tiny local folder and records its calls."""

from __future__ import annotations

import pytest

from zerocon_core.diffusers_host import sd_models

from .tiny import tiny_sd_folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return tiny_sd_folder(tmp_path_factory.mktemp("hub") / "sd")


def test_model_source_forms(tiny_folder, tmp_path):
    S = sd_models.ModelSource
    assert sd_models.model_source(None) == S("hub", sd_models.DEFAULT_MODEL)
    assert sd_models.model_source(tiny_folder) == S("folder", str(tiny_folder))
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"")
    assert sd_models.model_source(ckpt) == S("checkpoint", str(ckpt))
    assert sd_models.model_source("some-owner/some-model") == S("hub", "some-owner/some-model")
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(ValueError, match="is not a .safetensors or .ckpt checkpoint"):
        sd_models.model_source(other)
    with pytest.raises(FileNotFoundError, match="model file not found: .*missing.safetensors"):
        sd_models.model_source(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="model folder not found: .*no-such-dir"):
        sd_models.model_source(tmp_path / "no-such-dir")
    for path_like in ("./sd15", "a/b/c", "~/nothing-here-zerocon"):
        with pytest.raises(FileNotFoundError, match="model folder not found"):
            sd_models.model_source(path_like)
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        sd_models.model_source(tmp_path / "half")


class FakeHub:
    """``snapshot_download`` stand-in: ``cached`` says whether the cache holds the model (a partial cache: the
    folder lacks the weights)."""

    def __init__(self, folder, cached=True, exists=True):
        self.folder, self.cached, self.exists, self.calls = folder, cached, exists, []

    def __call__(self, repo_id, **kwargs):
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

        self.calls.append((repo_id, kwargs))
        if kwargs.get("local_files_only"):
            if self.cached is True:
                return str(self.folder)
            if self.cached == "partial" and kwargs["allow_patterns"] != ["model_index.json"]:
                return str(self.folder.parent / "empty")
            if self.cached == "partial":
                return str(self.folder)
            raise LocalEntryNotFoundError("not in the cache")
        if not self.exists:
            raise RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # as raised for a 404 (no response here)
        return str(self.folder)


def _online(monkeypatch):
    from huggingface_hub import constants

    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_cached_model_needs_no_network(tiny_folder, monkeypatch):
    hub = FakeHub(tiny_folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sd_models, "_snapshot_download", hub)
    assert sd_models.download_model("owner/model") == tiny_folder
    assert all(kw["local_files_only"] for _, kw in hub.calls) and {r for r, _ in hub.calls} == {"owner/model"}


def test_download_once_only_the_parts_the_edit_uses(tiny_folder, monkeypatch):
    _online(monkeypatch)
    hub = FakeHub(tiny_folder, cached=False)
    monkeypatch.setattr(sd_models, "_snapshot_download", hub)
    assert sd_models.download_model(sd_models.DEFAULT_MODEL) == tiny_folder
    downloads = [kw["allow_patterns"] for _, kw in hub.calls if not kw.get("local_files_only")]
    assert downloads[0] == ["model_index.json"]
    weights = downloads[-1]
    assert {
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "unet/config.json",
        "scheduler/*",
        "tokenizer/*",
    } <= set(weights)
    # one weight format, full precision: no fp16 / EMA / .bin / safety checker files
    assert not [p for p in weights if "fp16" in p or "ema" in p or p.endswith(".bin") or "safety" in p]
    assert "text_encoder_2/model.safetensors" not in weights  # SD1.5 has no second encoder


def test_partial_cache_is_completed_online(tiny_folder, monkeypatch):
    (tiny_folder.parent / "empty").mkdir(exist_ok=True)
    _online(monkeypatch)
    hub = FakeHub(tiny_folder, cached="partial")
    monkeypatch.setattr(sd_models, "_snapshot_download", hub)
    assert sd_models.download_model("owner/model") == tiny_folder
    assert [kw.get("local_files_only", False) for _, kw in hub.calls] == [True, True, False]


def test_offline_and_not_cached_says_what_to_put_where(tiny_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = FakeHub(tiny_folder, cached=False)
    monkeypatch.setattr(sd_models, "_snapshot_download", hub)
    with pytest.raises(FileNotFoundError) as info:
        sd_models.download_model(sd_models.DEFAULT_MODEL)
    assert str(info.value) == (
        "the files of model stable-diffusion-v1-5/stable-diffusion-v1-5 are not on this machine and downloads are "
        "off (HF_HUB_OFFLINE is set): run once online to download it to the Hugging Face cache, or pass --model "
        "with a checkpoint file (e.g. ComfyUI/models/checkpoints/<name>.safetensors) or a diffusers folder "
        "(huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir DIR on a machine that "
        "is online)"
    )
    assert all(kw.get("local_files_only") for _, kw in hub.calls)


def test_unknown_model_id(tiny_folder, monkeypatch):
    _online(monkeypatch)
    monkeypatch.setattr(sd_models, "_snapshot_download", FakeHub(tiny_folder, cached=False, exists=False))
    with pytest.raises(FileNotFoundError, match="'models/sd15' is neither a local file or folder nor a model on"):
        sd_models.download_model("models/sd15")


def test_load_model_from_a_hub_id(tiny_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sd_models, "_snapshot_download", FakeHub(tiny_folder))
    parts = sd_models.load_model(sd_models.model_source(None))
    ref = sd_models.load_folder(tiny_folder)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(parts, name).state_dict(), getattr(ref, name).state_dict()
        assert set(a) == set(b) and all((a[k] == b[k]).all() for k in a)
