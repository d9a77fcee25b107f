"""Runs the ComfyUI integration suite (tests/comfyui) inside a real ComfyUI checkout and its own Python.

ComfyUI is found through ``COMFYUI_PATH`` (default ``~/ComfyUI``); its interpreter through
``COMFYUI_PYTHON`` (default: ``<COMFYUI_PATH>/.venv/bin/python``). When either is missing the test is
skipped with the reason, and the reason is written to ``$ZEROCON_REPORT_DIR/comfyui-integration.txt`` so
that ``tools/test.sh`` (the test command ``.ci/run`` calls) can say loudly whether the integration tests ran.
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
        Path(out, "comfyui-integration.txt").write_text(text + "\n")


def _find() -> tuple[Path | None, Path | None, str]:
    comfy = Path(os.environ.get("COMFYUI_PATH", str(Path.home() / "ComfyUI"))).expanduser()
    if not (comfy / "comfy" / "model_base.py").is_file():
        return None, None, f"no ComfyUI checkout at {comfy} (set COMFYUI_PATH)"
    py = os.environ.get("COMFYUI_PYTHON") or str(comfy / ".venv" / "bin" / "python")
    if not Path(py).is_file():
        return comfy, None, f"no Python for ComfyUI at {py} (set COMFYUI_PYTHON to ComfyUI's interpreter)"
    return comfy, Path(py), ""


def test_comfyui_integration_suite():
    comfy, py, why = _find()
    if why:
        _report(f"SKIPPED: {why}")
        pytest.skip(f"ComfyUI integration tests SKIPPED: {why}")
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
    _report(f"RAN in {comfy} with {py}: {summary.strip('= ')}")
    sys.stderr.write(out[-20000:])
    assert proc.returncode == 0, f"ComfyUI integration suite failed ({summary}):\n{out[-20000:]}"
    assert " passed" in summary and "skipped" not in summary.split("passed")[0], summary
