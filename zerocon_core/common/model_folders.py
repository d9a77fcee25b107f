"""Local model folders in transformers ``save_pretrained`` layout: one check of what loading a model needs.

Every engine loader (BLIP, DINO, the CLIP metric) reads a local folder only and checks it with
``check_model_folder`` first, so a missing or incomplete folder fails with one message naming the folder,
what is missing and the Hugging Face repository whose files belong there. Nothing is downloaded here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["WEIGHTS", "ModelFolder", "ModelFolderError", "check_model_folder", "hub_offline", "missing_files"]

# One of these holds the weights (safetensors or PyTorch pickle, single file or sharded with an index).
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")

_TRUE = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """True when Hugging Face downloads are switched off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``).

    The one test for every downloader (the CLI's model, the nodes' BLIP/DINO/CLIP folders)."""
    if any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - nothing can download without huggingface_hub
        return True
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


@dataclass(frozen=True)
class ModelFolder:
    """What a model folder must hold.

    kind: the model, as messages name it ("BLIP captioning model").
    model_id: the Hugging Face repository its files normally come from.
    required: groups of file names; a folder needs at least one file of every group.
    saved_by: the transformers classes whose ``save_pretrained`` writes such a folder, for messages.
    """

    kind: str
    model_id: str
    required: tuple[tuple[str, ...], ...]
    saved_by: str


class ModelFolderError(FileNotFoundError):
    """A model folder that does not exist (``missing`` is None) or lacks files (``missing``: one entry per
    unmet group of ``ModelFolder.required``, its alternatives joined by " or ")."""

    def __init__(self, message: str, folder: str, missing: list[str] | None, model_id: str):
        super().__init__(message)
        self.folder = folder
        self.missing = missing
        self.model_id = model_id


def missing_files(folder: str | os.PathLike, required: ModelFolder) -> list[str] | None:
    """None when ``folder`` is not a directory, else the unmet groups of ``required`` (empty: complete)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return None
    return [
        " or ".join(group)
        for group in required.required
        if not any(os.path.isfile(os.path.join(folder, name)) for name in group)
    ]


def check_model_folder(folder: str | os.PathLike, required: ModelFolder, model_id: str | None = None) -> str:
    """Return ``folder`` (a str) when it holds a file of every group of ``required``; else raise
    ``ModelFolderError`` naming the folder, what is missing and the repository to copy (``model_id``,
    default ``required.model_id``)."""
    folder = os.fspath(folder)
    model_id = model_id or required.model_id
    missing = missing_files(folder, required)
    if missing == []:
        return folder
    what = "the folder does not exist" if missing is None else "missing " + ", ".join(missing)
    raise ModelFolderError(
        f"{required.kind} not found: {what} in {folder!r}. Put a transformers copy of '{model_id}' there "
        f"(all files of https://huggingface.co/{model_id}, or {required.saved_by} saved there with save_pretrained).",
        folder,
        missing,
        model_id,
    )
