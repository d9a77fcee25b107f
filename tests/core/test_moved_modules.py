"""The modules that moved into folders still import by their old paths, as the very same module objects
(``zerocon_core.MOVED``, ``nodes.MOVED``, ``common/moved.py``), and ``python -m <old path>`` still runs."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import zerocon_core

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("old", sorted(zerocon_core.MOVED))
def test_an_old_core_path_imports_the_moved_module(old):
    moved = importlib.import_module(f"zerocon_core.{zerocon_core.MOVED[old]}")
    assert importlib.import_module(f"zerocon_core.{old}") is moved
    assert getattr(zerocon_core, old) is moved  # ``zerocon_core.sampler`` as an attribute too
    assert not (ROOT / "zerocon_core" / f"{old}.py").exists()  # no copy left behind at the old place


def test_from_package_import_and_old_names_of_moved_things():
    from zerocon_core.diffuseit_start import renoise

    from zerocon_core import direction
    from zerocon_core.diffuseit import diffuseit_sample  # the former module zerocon_core.diffuseit
    from zerocon_core.method import parameterization
    from zerocon_core.method.sampler import cfg_combine
    from zerocon_core.method.steps import cfg_combine as moved_cfg
    from zerocon_core.toyworld.checker import object_mask  # noqa: F401  (a package's submodule, unmoved)

    assert direction.__name__ == "zerocon_core.text.direction"
    assert diffuseit_sample.__module__ == "zerocon_core.diffuseit.guidance"
    assert renoise is parameterization.renoise and cfg_combine is moved_cfg
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("zerocon_core.no_such_module")


def test_every_moved_node_module_exists_at_its_new_place_only():
    text = (ROOT / "nodes" / "__init__.py").read_text()
    start = text.index("MOVED = {") + len("MOVED = ")
    moved = ast.literal_eval(text[start : text.index("}", start) + 1])
    for old, new in moved.items():
        assert (ROOT / "nodes" / (new.replace(".", "/") + ".py")).is_file(), new
        assert not (ROOT / "nodes" / f"{old}.py").exists(), old


def test_python_m_an_old_path_runs_the_moved_module():
    out = subprocess.run(
        [sys.executable, "-m", "zerocon_core.evaluate", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "python -m zerocon_core.evaluation.evaluate" in out.stdout
