"""zerocon_core.common.model_folders: the one check every engine loader runs on a local model folder."""

from __future__ import annotations

import pytest

from zerocon_core.common.model_folders import WEIGHTS, ModelFolder, ModelFolderError, check_model_folder, missing_files
from zerocon_core.diffuseit import dino
from zerocon_core.evaluation import metrics
from zerocon_core.text import captioning

SPEC = ModelFolder(
    kind="Test model",
    model_id="org/test-model",
    required=(("config.json",), WEIGHTS, ("tokenizer.json", "vocab.txt")),
    saved_by="TestModel",
)


def write(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text("{}")
    return folder


def test_complete_folder_passes_with_any_alternative_of_each_group(tmp_path):
    for weights in WEIGHTS:
        for tokenizer in ("tokenizer.json", "vocab.txt"):
            folder = write(tmp_path / f"{weights}-{tokenizer}", "config.json", weights, tokenizer)
            assert check_model_folder(folder, SPEC) == str(folder)
            assert missing_files(folder, SPEC) == []


def test_missing_folder_names_folder_and_model_id(tmp_path):
    folder = tmp_path / "nope"
    with pytest.raises(ModelFolderError) as err:
        check_model_folder(folder, SPEC)
    assert isinstance(err.value, FileNotFoundError)
    assert err.value.missing is None and err.value.folder == str(folder) and err.value.model_id == "org/test-model"
    assert str(err.value) == (
        f"Test model not found: the folder does not exist in {str(folder)!r}. Put a transformers copy of "
        "'org/test-model' there (all files of https://huggingface.co/org/test-model, or TestModel saved there "
        "with save_pretrained)."
    )


def test_incomplete_folder_lists_every_unmet_group_once(tmp_path):
    folder = write(tmp_path / "partial", "vocab.txt", "model.safetensors.index.json.tmp")
    with pytest.raises(ModelFolderError) as err:
        check_model_folder(folder, SPEC)
    assert err.value.missing == ["config.json", " or ".join(WEIGHTS)]
    assert "missing config.json, model.safetensors or model.safetensors.index.json or pytorch_model.bin" in str(
        err.value
    )


def test_model_id_override_names_the_chosen_model(tmp_path):
    with pytest.raises(ModelFolderError, match="'org/other'") as err:
        check_model_folder(tmp_path / "x", SPEC, model_id="org/other")
    assert "org/test-model" not in str(err.value) and err.value.model_id == "org/other"


def test_a_directory_named_like_a_required_file_does_not_count(tmp_path):
    folder = write(tmp_path / "m", "model.safetensors", "tokenizer.json")
    (folder / "config.json").mkdir()
    assert missing_files(folder, SPEC) == ["config.json"]


@pytest.mark.parametrize(
    "check, spec, extra",
    [
        (captioning.check_blip_folder, captioning.BLIP_FOLDER, ["tokenizer.json", "preprocessor_config.json"]),
        (dino.check_dino_folder, dino.DINO_FOLDER, []),
        (metrics.check_clip_folder, metrics.CLIP_FOLDER, ["vocab.json"]),
    ],
)
def test_engine_checks_use_their_spec(tmp_path, check, spec, extra):
    folder = write(tmp_path / "m", "config.json", "pytorch_model.bin", *extra)
    check(folder)  # complete
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing config\.json in") as err:
        check(folder)
    assert spec.kind in str(err.value) and spec.model_id in str(err.value)
    with pytest.raises(FileNotFoundError, match="'org/picked'"):
        check(folder, model_id="org/picked")


def test_blip_needs_tokenizer_and_processor_files(tmp_path):
    folder = write(tmp_path / "blip", "config.json", "model.safetensors")
    with pytest.raises(FileNotFoundError) as err:
        captioning.check_blip_folder(folder)
    msg = str(err.value)
    assert "tokenizer.json or vocab.txt" in msg and "preprocessor_config.json or processor_config.json" in msg
