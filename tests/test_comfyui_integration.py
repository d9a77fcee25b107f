"""Runs the ComfyUI integration suite (tests/comfyui) inside each real ComfyUI checkout, with its own Python.

The checkouts come from ``ZEROCON_COMFYUI_TARGETS`` (``path=python;path=python;...``, what ``tools/test.sh``
exports after building one environment per checkout), else from ``COMFYUI_PATH`` (default ``~/ComfyUI``) and
``COMFYUI_PYTHON`` (default ``<COMFYUI_PATH>/.venv/bin/python``). Each checkout is one test, named by its ComfyUI
version. When none is usable the test is skipped with the reason. What ran, or why not, is written to
``$ZEROCON_REPORT_DIR/comfyui-integration.txt`` (one line per checkout) so that ``tools/test.sh`` (the test command
``.ci/run`` calls) can say loudly which ComfyUI versions the integration tests ran on.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _report(text: str) -> None:
    out = os.environ.get("ZEROCON_REPORT_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        with open(Path(out, "comfyui-integration.txt"), "a") as f:
            f.write(text + "\n")


def _version(comfy: Path) -> str:
    match = re.search(r'__version__\s*=\s*"([^"]+)"', (comfy / "comfyui_version.py").read_text(errors="replace"))
    return match.group(1) if match else "unknown"


def _targets() -> list[tuple[Path, Path | None, str]]:
    """(checkout, python, why-not) for every configured ComfyUI checkout."""
    spec = os.environ.get("ZEROCON_COMFYUI_TARGETS")
    if spec:
        pairs = [item.split("=", 1) for item in spec.split(";") if "=" in item]
    else:
        comfy = os.environ.get("COMFYUI_PATH", str(Path.home() / "ComfyUI"))
        pairs = [(comfy, os.environ.get("COMFYUI_PYTHON") or str(Path(comfy).expanduser() / ".venv/bin/python"))]
    out = []
    for comfy, py in pairs:
        comfy = Path(comfy).expanduser()
        if not (comfy / "comfy" / "model_base.py").is_file():
            out.append((comfy, None, f"no ComfyUI checkout at {comfy} (set COMFYUI_PATH)"))
        elif not Path(py).is_file():
            out.append((comfy, None, f"no Python for ComfyUI at {py} (set COMFYUI_PYTHON to ComfyUI's interpreter)"))
        else:
            out.append((comfy, Path(py), ""))
    return out


TARGETS = _targets()


@pytest.mark.parametrize(
    "comfy,py,why", TARGETS, ids=[_version(c) if not why else f"missing-{i}" for i, (c, _, why) in enumerate(TARGETS)]
)
def test_comfyui_integration_suite(comfy, py, why):
    if why:
        _report(f"SKIPPED: {why}")
        pytest.skip(f"ComfyUI integration tests SKIPPED: {why}")
    version = _version(comfy)
    env = dict(os.environ, COMFYUI_PATH=str(comfy), ZEROCON_IN_COMFYUI="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [
        str(py),
        "-m",
        "pytest",
        "tests/comfyui",
        "-q",
        "-p",
        "no:cacheprovider",
        "-x" if os.environ.get("ZEROCON_FAIL_FAST") else "-ra",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    out = proc.stdout + proc.stderr
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    summary = next(
        (ln for ln in reversed(lines) if re.search(r"\d+ (passed|failed|error)", ln)), lines[-1] if lines else ""
    )
    _report(f"RAN on ComfyUI {version} ({comfy}, {py}): {summary.strip('= ')}")
    sys.stderr.write(out[-20000:])
    assert proc.returncode == 0, f"ComfyUI {version} integration suite failed ({summary}):\n{out[-20000:]}"
    assert " passed" in summary, summary
