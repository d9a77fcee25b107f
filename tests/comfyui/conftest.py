"""Integration-test setup: a real ComfyUI checkout, on CPU, with the pack loaded the way ComfyUI loads it.

Run (inside ComfyUI's own environment):

    ZEROCON_IN_COMFYUI=1 COMFYUI_PATH=~/ComfyUI <comfy-python> -m pytest tests/comfyui -q -p no:cacheprovider

- ``COMFYUI_PATH`` goes first on ``sys.path`` (ComfyUI's top-level ``nodes`` module must win over anything
  called ``nodes``), and ``comfy.cli_args.args.cpu = True`` is set before ``comfy.model_management`` is
  imported (it picks its device at import time).
- The pack is imported as ComfyUI's ``nodes.load_custom_node`` does: ``spec_from_file_location`` on the
  repository's ``__init__.py`` under the path-derived module name (the path with "." replaced by "_x_"),
  so every relative import inside the pack is exercised. ``pack_module("nodes.classes.sampling_nodes")`` returns
  a submodule of that package.
- Tiny random models come from ``tiny_models`` (ComfyUI's own classes, built under inference mode).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMFYUI = Path(os.environ.get("COMFYUI_PATH", str(Path.home() / "ComfyUI"))).expanduser().resolve()

if not (COMFYUI / "comfy" / "model_base.py").is_file():
    raise pytest.UsageError(f"tests/comfyui needs a ComfyUI checkout: none at {COMFYUI} (set COMFYUI_PATH)")

if str(COMFYUI) in sys.path:
    sys.path.remove(str(COMFYUI))
sys.path.insert(0, str(COMFYUI))

from comfy.cli_args import args as _comfy_args  # noqa: E402

_comfy_args.cpu = True

import comfy.model_management  # noqa: E402,F401
import torch  # noqa: E402

# The tiny models are far too small for intra-op parallelism: with several threads on a shared CPU, OpenMP
# spin-waiting makes every op tens of times slower. One thread unless ZEROCON_TEST_THREADS says otherwise.
torch.set_num_threads(int(os.environ.get("ZEROCON_TEST_THREADS", "1")))

_comfy_nodes = importlib.import_module("nodes")  # ComfyUI's nodes.py: must not be the pack's nodes/
assert Path(_comfy_nodes.__file__).resolve().parent == COMFYUI, f"wrong 'nodes' module: {_comfy_nodes.__file__}"

PACK_MODULE_NAME = str(REPO).replace(".", "_x_")  # what ComfyUI's load_custom_node uses for a folder


def load_pack() -> types.ModuleType:
    """Import the repository as ComfyUI imports a custom-node folder (idempotent)."""
    if PACK_MODULE_NAME in sys.modules:
        return sys.modules[PACK_MODULE_NAME]
    init = REPO / "__init__.py"
    if init.is_file():
        spec = importlib.util.spec_from_file_location(PACK_MODULE_NAME, init)
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_MODULE_NAME] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[PACK_MODULE_NAME]
            raise
    else:  # before the entry point exists: the folder as a bare package, so relative imports still resolve
        module = types.ModuleType(PACK_MODULE_NAME)
        module.__path__ = [str(REPO)]
        module.__package__ = PACK_MODULE_NAME
        sys.modules[PACK_MODULE_NAME] = module
    return module


def pack_module(name: str) -> types.ModuleType:
    """A submodule of the loaded pack, e.g. ``pack_module("nodes.classes.sampling_nodes")``."""
    load_pack()
    return importlib.import_module(f"{PACK_MODULE_NAME}.{name}")


def pack_fixture(name: str):
    """A module-scoped fixture giving ``pack_module(name)``, named by what it is bound to: ``dn = pack_fixture(...)``."""

    def module():
        return pack_module(name)

    return pytest.fixture(scope="module")(module)


CORE_HELPERS = "zerocon_core_test_helpers"  # tests/core imported under this name (ComfyUI has its own "tests")


def core_helper(name: str) -> types.ModuleType:
    """A tiny-model builder of the core tests, e.g. ``core_helper("tiny_vision")`` (tests/core/tiny_vision.py)."""
    if CORE_HELPERS not in sys.modules:
        folder = REPO / "tests" / "core"
        spec = importlib.util.spec_from_file_location(
            CORE_HELPERS, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[CORE_HELPERS] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{CORE_HELPERS}.{name}")


def module_from_file(name: str, path: Path) -> types.ModuleType:
    """The file ``path`` executed as a fresh module ``name`` (not registered in ``sys.modules``)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def node_infos() -> dict:
    """``{node id: GET_NODE_INFO_V1()}`` of every node the pack registers (what ``/object_info`` serves)."""
    package = pack_module("nodes")
    out = {}
    for module_name in package.NODE_MODULES:
        for cls in pack_module(f"nodes.{module_name}").NODES:
            info = cls.GET_NODE_INFO_V1()
            out[info["name"]] = info
    return out


@pytest.fixture(scope="session")
def pack() -> types.ModuleType:
    return load_pack()


@pytest.fixture(scope="session")
def zc() -> types.SimpleNamespace:
    """The pack's sampling-side modules."""
    return types.SimpleNamespace(
        sampling=pack_module("nodes.classes.sampling_nodes"),
        guidance=pack_module("nodes.classes.guidance_nodes"),
        denoiser=pack_module("nodes.families.comfy_denoiser"),
        families=pack_module("nodes.families"),
        weights=pack_module("nodes.glue.weights"),
    )


@pytest.fixture(autouse=True)
def _no_pending_interrupt():
    """A test that interrupts must not leak the flag into the next one."""
    comfy.model_management.interrupt_current_processing(False)
    yield
    comfy.model_management.interrupt_current_processing(False)


@pytest.fixture
def sd15_model():
    import tiny_models

    return tiny_models.sd15()


@pytest.fixture
def sd2v_model():
    import tiny_models

    return tiny_models.sd2v()


@pytest.fixture
def sdxl_model():
    import tiny_models

    return tiny_models.sdxl()


@contextlib.contextmanager
def temporary_model_folders(base: Path, keys):
    """Empty folders ``base/<key>`` first in ComfyUI's search order for each of ``keys`` (pack keys such as
    "blip" registered first); ComfyUI's folder table and file-list cache are restored afterwards."""
    import folder_paths

    pack_module("nodes.glue.paths")  # registers the pack's keys
    saved = {k: copy.deepcopy(folder_paths.folder_names_and_paths[k]) for k in keys}
    try:
        for key in keys:
            (base / key).mkdir(parents=True, exist_ok=True)
            folder_paths.add_model_folder_path(key, str(base / key), is_default=True)
        yield base
    finally:
        folder_paths.folder_names_and_paths.update(saved)
        folder_paths.filename_list_cache.clear()


def forbid_downloads(monkeypatch) -> None:
    """Any call of ``huggingface_hub.snapshot_download`` fails the test."""
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError("a test tried to download from the Hugging Face hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)


def run_node(node_cls, **inputs):
    """Call a V3 node's ``execute`` as ComfyUI does: under ``torch.inference_mode()``; returns the outputs tuple."""
    with torch.inference_mode():
        out = node_cls.execute(**inputs)
    return tuple(out.args) if hasattr(out, "args") else tuple(out)


def load_on_cpu(loader, model: str, allow_download: bool = False) -> tuple:
    """A model loader node's outputs (BLIP, DINO, CLIP metric loaders) for ``model`` in fp32 on the CPU."""
    return run_node(loader, model=model, precision="fp32", device="cpu", allow_download=allow_download)


@pytest.fixture
def run():
    """``run(NodeClass, **inputs)``: see ``run_node``."""
    return run_node
