"""Model folders ZeroCon registers with ComfyUI's ``folder_paths``.

- ``models/blip/<name>/``: BLIP captioning models in transformers ``save_pretrained`` layout.
- ``models/dino/<name>/``: DINO-ViT models in the same layout.
- ``models/clip_metric/<name>/``: full CLIP models (text and vision towers) for the edit metrics, same layout.
- ``models/edit_directions/*.safetensors``: saved edit directions.

Users can add more locations for the same keys (``blip``, ``dino``, ``clip_metric``, ``edit_directions``) in
``extra_model_paths.yaml``. Registration is idempotent and runs when this module is imported.
"""

from __future__ import annotations

import os

import folder_paths

BLIP = "blip"
DINO = "dino"
CLIP_METRIC = "clip_metric"
EDIT_DIRECTIONS = "edit_directions"
DIRECTION_EXTENSION = ".safetensors"

_EXTENSIONS = {BLIP: set(), DINO: set(), CLIP_METRIC: set(), EDIT_DIRECTIONS: {DIRECTION_EXTENSION}}


def default_folder(key: str) -> str:
    """``<ComfyUI>/models/<key>``: where ComfyUI-ZeroCon's own files for ``key`` go by default."""
    return os.path.join(folder_paths.models_dir, key)


def register() -> None:
    """Add the default folders (after any the user configured) and their file extensions."""
    for key, extensions in _EXTENSIONS.items():
        folder_paths.add_model_folder_path(key, default_folder(key))
        if extensions:
            folder_paths.folder_names_and_paths[key][1].update(extensions)


def folders(key: str) -> list[str]:
    """Every folder registered for ``key``, in priority order."""
    return folder_paths.get_folder_paths(key)


def model_folders(key: str) -> list[str]:
    """Names of the model folders (subfolders holding a ``config.json``) found under ``key``'s folders."""
    names: set[str] = set()
    for base in folders(key):
        try:
            entries = os.listdir(base)
        except OSError:
            continue
        for name in entries:
            if os.path.isfile(os.path.join(base, name, "config.json")):
                names.add(name)
    return sorted(names)


def find_model_folder(key: str, name: str) -> str | None:
    """The first ``<folder>/<name>`` that exists for ``key``, or None."""
    for base in folders(key):
        path = os.path.join(base, name)
        if os.path.isdir(path):
            return path
    return None


def download_folder(key: str, name: str) -> str:
    """Where a missing model ``name`` is placed (the first registered folder for ``key``)."""
    return os.path.join(folders(key)[0], name)


register()
