"""nodes/glue/compat.py: the pack says clearly (one log line, no stack trace) when ComfyUI is too old.

Unit checks of the version logic, the pin against pyproject's ``requires-comfyui``, and an end-to-end check:
two older ComfyUI versions taken from the checkout's own git history (``git archive`` into a temp folder;
the checkout is not touched) are started with this pack in their custom_nodes, and their log must carry
ZeroCon's message: one from before the V3 API (ComfyUI never calls ``comfy_entrypoint``; the message comes
from the package import) and one V3 version older than the pin (the entry point registers no node).
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import COMFYUI, REPO, module_from_file


def _compat():
    return module_from_file("zerocon_compat_under_test", REPO / "nodes" / "glue" / "compat.py")


def test_parse_version():
    c = _compat()
    assert c.parse_version("0.3.64") == (0, 3, 64)
    assert c.parse_version("v0.3.58") == (0, 3, 58)
    assert c.parse_version("0.3.65-dev+abc") == (0, 3, 65)
    assert c.parse_version("0.4") == (0, 4, 0)
    assert c.parse_version("") is None and c.parse_version(None) is None and c.parse_version("nightly") is None


def test_problem_messages():
    c = _compat()
    assert c.problem("0.3.64", True) is None
    assert c.problem(c.MIN_COMFYUI_TEXT, True) is None
    old = c.problem("0.3.40", False)
    assert old and f">= {c.MIN_COMFYUI_TEXT}" in old and "0.3.40" in old and "update ComfyUI" in old
    assert "0.3.59" in c.problem("0.3.59", True)
    no_api = c.problem(None, False)  # no version module and no comfy_api.latest
    assert no_api and "comfy_api.latest" in no_api
    assert c.problem(None, True) is None  # unknown version (a fork) with the V3 API: do not block


def test_this_comfyui_is_supported():
    assert _compat().problem() is None, _compat().problem()


def test_min_version_matches_pyproject():
    text = (REPO / "pyproject.toml").read_text()
    m = re.search(r'^requires-comfyui\s*=\s*"\s*>=\s*([0-9.]+)\s*"', text, re.M)
    assert m, 'pyproject.toml has no requires-comfyui = ">=X.Y.Z"'
    assert _compat().MIN_COMFYUI_TEXT == m.group(1), "nodes/glue/compat.py MIN_COMFYUI differs from requires-comfyui"


def test_log_once_without_traceback(monkeypatch, caplog):
    c = _compat()
    monkeypatch.setattr(c, "comfyui_version", lambda: "0.3.40")
    with caplog.at_level(logging.ERROR, logger="zerocon"):
        assert c.log_if_unsupported() is False
        assert c.log_if_unsupported() is False
    records = [r for r in caplog.records if r.name == "zerocon"]
    assert len(records) == 1 and records[0].exc_info is None and "0.3.40" in records[0].getMessage()


# ---------------------------------------------------------------------------------------------------------
# End to end: older ComfyUI versions from the checkout's git history


def _git(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(COMFYUI), *args], capture_output=True, text=True, **kw)


def _older_commit(below: tuple[int, int, int]) -> tuple[str, str] | None:
    """(commit, version) of the newest commit whose comfyui_version.py is older than ``below``."""
    c = _compat()
    log = _git("log", "--format=%H", "--", "comfyui_version.py")
    if log.returncode != 0:
        return None
    for commit in log.stdout.split()[:200]:
        shown = _git("show", f"{commit}:comfyui_version.py")
        m = re.search(r'__version__\s*=\s*"([^"]+)"', shown.stdout)
        v = c.parse_version(m.group(1)) if m else None
        if v is not None and v < below:
            return commit, m.group(1)
    return None


def _export(commit: str, dest: Path) -> None:
    """``git archive`` of ``commit`` into ``dest``, leaving out blobs a partial clone does not have."""
    tree = _git("ls-tree", "-r", commit)
    entries = [ln.split(None, 3) for ln in tree.stdout.splitlines()]
    check = subprocess.run(
        ["git", "-C", str(COMFYUI), "cat-file", "--batch-check"],
        input="\n".join(e[2] for e in entries),
        capture_output=True,
        text=True,
    )
    missing = [e[3] for e, line in zip(entries, check.stdout.splitlines()) if line.endswith("missing")]
    excludes = [f":(exclude){p}" for p in missing]
    archive = subprocess.run(["git", "-C", str(COMFYUI), "archive", commit, "--", ".", *excludes], capture_output=True)
    if not archive.stdout:
        pytest.skip(f"git archive {commit} failed: {archive.stderr.decode()[-300:]}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)


@pytest.mark.parametrize("case", ["before-v3", "v3-too-old"])
def test_old_comfyui_logs_clear_error(case):
    from .comfy_server import ComfyServer, make_base

    c = _compat()
    found = _older_commit((0, 3, 48) if case == "before-v3" else c.MIN_COMFYUI)
    if found is None:
        pytest.skip(f"no older ComfyUI version in the git history of {COMFYUI}")
    commit, version = found
    with tempfile.TemporaryDirectory(prefix=f"zerocon-old-comfyui-{version}-") as tmp:
        old, base = Path(tmp) / "ComfyUI", Path(tmp) / "base"
        old.mkdir()
        _export(commit, old)
        make_base(base, REPO)
        server = ComfyServer(old, sys.executable, base, legacy=True)
        try:
            server.start()
            log = server.log_tail(200000)
        finally:
            server.stop()
    lines = [ln for ln in log.splitlines() if "ComfyUI-ZeroCon needs ComfyUI" in ln]
    assert lines, f"ComfyUI {version}: no ZeroCon version message in the log:\n{log[-4000:]}"
    assert f">= {c.MIN_COMFYUI_TEXT}" in lines[0] and version in lines[0], lines[0]
    pack_trace = re.search(r"Traceback[^\n]*\n(?:[ \t].*\n)*?.*ComfyUI-ZeroCon", log)
    assert pack_trace is None, f"a stack trace mentions the pack:\n{log[-4000:]}"
