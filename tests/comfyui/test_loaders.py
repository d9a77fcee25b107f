"""nodes/glue/loaders.py: the model-folder logic the BLIP, DINO and CLIP-metric loaders share.

No network: ``snapshot_download`` is replaced by a fake hub repository that honours ``allow_patterns`` as
the real one does (fnmatch on each file name), holding the weights in several formats.
"""

from __future__ import annotations

import fnmatch
import os

import pytest
import torch
from conftest import forbid_downloads, pack_fixture, pack_module, temporary_model_folders

# What a typical transformers hub repository holds: the same weights in four formats.
REPO_FILES = (
    "config.json",
    "model.safetensors",
    "pytorch_model.bin",
    "tf_model.h5",
    "flax_model.msgpack",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "preprocessor_config.json",
    "special_tokens_map.json",
    "README.md",
)


loaders = pack_fixture("nodes.glue.loaders")


@pytest.fixture(scope="module")
def sources():
    return {
        "blip": pack_module("nodes.classes.blip_nodes").SOURCE,
        "dino": pack_module("nodes.classes.dino_nodes").SOURCE,
        "clip_metric": pack_module("nodes.classes.metrics_nodes").SOURCE,
    }


@pytest.fixture
def model_dirs(tmp_path, monkeypatch, loaders):
    """Temporary model folders first in ComfyUI's search order; downloads fail unless a test fakes them."""
    forbid_downloads(monkeypatch)
    monkeypatch.setattr(loaders, "hub_offline", lambda: False)
    with temporary_model_folders(tmp_path, ("blip", "dino", "clip_metric")):
        yield tmp_path


def fake_hub(monkeypatch, files=REPO_FILES):
    """Replace snapshot_download by a repository holding ``files``; returns the list of calls."""
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, local_dir, allow_patterns=None, **kwargs):
        calls.append((repo_id, local_dir, allow_patterns))
        os.makedirs(local_dir, exist_ok=True)
        for name in files:
            if allow_patterns is None or any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                with open(os.path.join(local_dir, name), "w") as f:
                    f.write("{}")
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


@pytest.mark.parametrize("key", ["blip", "dino", "clip_metric"])
def test_download_takes_one_weight_format(loaders, sources, model_dirs, monkeypatch, key):
    source = sources[key]
    name, repo = next(iter(source.known.items()))
    calls = fake_hub(monkeypatch)
    folder = loaders.resolve_folder(source, name, allow_download=True)
    assert folder == str(model_dirs / key / name)
    assert len(calls) == 1 and calls[0][:2] == (repo, folder) and calls[0][2] is not None
    got = set(os.listdir(folder))
    assert "model.safetensors" in got and "config.json" in got
    assert not got & {"pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "README.md"}, got
    # a second load finds the folder and downloads nothing
    assert loaders.resolve_folder(source, name, allow_download=True) == folder and len(calls) == 1


def test_download_falls_back_to_pytorch_weights_without_safetensors(loaders, sources, model_dirs, monkeypatch):
    calls = fake_hub(monkeypatch, [f for f in REPO_FILES if f != "model.safetensors"])
    folder = loaders.resolve_folder(sources["blip"], "blip-image-captioning-large", allow_download=True)
    assert [c[0] for c in calls] == ["Salesforce/blip-image-captioning-large"] * 2
    got = set(os.listdir(folder))
    assert "pytorch_model.bin" in got and not got & {"tf_model.h5", "flax_model.msgpack"}, got


def test_repository_without_usable_weights_says_what_is_missing(loaders, sources, model_dirs, monkeypatch):
    fake_hub(monkeypatch, ["config.json", "tf_model.h5"])
    with pytest.raises(FileNotFoundError) as err:
        loaders.resolve_folder(sources["dino"], "dino-vitb8", allow_download=True)
    msg = str(err.value)
    assert msg.startswith("ZeroCon DINO Loader: no DINO ViT model in ")
    assert "(the folder is still incomplete after downloading). It lacks model.safetensors or " in msg
    assert "'facebook/dino-vitb8'" in msg


def test_failed_download_is_reported_with_its_cause(loaders, sources, model_dirs, monkeypatch):
    import huggingface_hub

    def broken(*args, **kwargs):
        raise OSError("connection refused")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", broken)
    with pytest.raises(FileNotFoundError, match="downloading it failed: connection refused") as err:
        loaders.resolve_folder(sources["clip_metric"], "clip-vit-base-patch16", allow_download=True)
    assert str(model_dirs / "clip_metric" / "clip-vit-base-patch16") in str(err.value)
    assert "'openai/clip-vit-base-patch16'" in str(err.value)


def test_unknown_name_is_never_downloaded_and_names_the_default_model(loaders, sources, model_dirs, monkeypatch):
    calls = fake_hub(monkeypatch)
    with pytest.raises(FileNotFoundError) as err:
        loaders.resolve_folder(sources["clip_metric"], "my-clip", allow_download=True)
    assert not calls
    msg = str(err.value)
    assert "(the folder is missing)." in msg and "'openai/clip-vit-large-patch14'" in msg
    assert "allow_download on" not in msg  # no download hint for a name that cannot be downloaded


def test_incomplete_known_folder_is_completed_by_the_download(loaders, sources, model_dirs, monkeypatch):
    folder = model_dirs / "dino" / "dino-vitb8"
    folder.mkdir()
    (folder / "config.json").write_text('{"mine": 1}')
    calls = fake_hub(monkeypatch)
    with pytest.raises(FileNotFoundError, match=r"the folder is incomplete and allow_download is off\)"):
        loaders.resolve_folder(sources["dino"], "dino-vitb8", allow_download=False)
    assert not calls
    assert loaders.resolve_folder(sources["dino"], "dino-vitb8", allow_download=True) == str(folder)
    assert len(calls) == 1 and (folder / "model.safetensors").is_file()


def test_offline_blocks_the_download(loaders, sources, model_dirs, monkeypatch):
    calls = fake_hub(monkeypatch)
    monkeypatch.setattr(loaders, "hub_offline", lambda: True)
    with pytest.raises(FileNotFoundError, match=r"\(the folder is missing and HF_HUB_OFFLINE is set\)"):
        loaders.resolve_folder(sources["blip"], "blip-image-captioning-base", allow_download=True)
    assert not calls


@pytest.mark.parametrize("value", ["1", "true", "ON"])
def test_offline_reads_both_environment_variables(loaders, monkeypatch, value):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setenv(var, value)
        assert loaders.hub_offline() is True


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "/abs"])
def test_names_that_are_not_folder_names_are_rejected(loaders, sources, model_dirs, name):
    with pytest.raises(ValueError, match=r"ZeroCon BLIP Loader: .* is not a folder name under models/blip"):
        loaders.resolve_folder(sources["blip"], name, allow_download=True)


def test_every_model_folder_is_registered_by_paths(sources):
    import folder_paths

    paths = pack_module("nodes.glue.paths")
    for key in ("blip", "dino", "clip_metric", "edit_directions"):
        assert paths.default_folder(key) in folder_paths.get_folder_paths(key), key
    assert {s.key for s in sources.values()} == {paths.BLIP, paths.DINO, paths.CLIP_METRIC}


def test_menu_lists_known_names_first_then_local_folders(loaders, sources, model_dirs):
    (model_dirs / "clip_metric" / "zz-local").mkdir()
    (model_dirs / "clip_metric" / "zz-local" / "config.json").write_text("{}")
    (model_dirs / "clip_metric" / "no-config").mkdir()
    names = loaders.model_names(sources["clip_metric"])
    assert names[:2] == ["clip-vit-large-patch14", "clip-vit-base-patch16"]
    assert "zz-local" in names and "no-config" not in names


def test_devices_and_precisions(loaders):
    cpu = torch.device("cpu")
    assert loaders.devices("cpu") == (cpu, cpu) and loaders.devices("cpu", text_encoder=True) == (cpu, cpu)
    assert loaders.dtype("bf16", cpu) is torch.bfloat16
    assert loaders.dtype("auto", cpu) is torch.float32  # ComfyUI runs fp32 on CPU
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        loaders.dtype("fp8", cpu)
