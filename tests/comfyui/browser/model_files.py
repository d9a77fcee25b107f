"""Model files for the browser tests: random-weight checkpoints (cached) and tiny transformers folders.

Checkpoints are built once per cache key (ComfyUI's version, then a hash of the builder's source, ComfyUI's
model detection and the interpreter) under ``$ZEROCON_BROWSER_CACHE`` (default:
``<tmp>/zerocon-browser-models``), never in the repository, by ``checkpoints.py`` in a subprocess of ComfyUI's
interpreter, and symlinked into the temp ComfyUI's ``models/checkpoints``. The tiny BLIP / DINO / CLIP-metric folders are cached the same way and copied
(they are small) into ``models/blip``, ``models/dino`` and ``models/clip_metric``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from . import checkpoints

HERE = Path(__file__).resolve().parent


def cache_root() -> Path:
    return Path(os.environ.get("ZEROCON_BROWSER_CACHE", os.path.join(tempfile.gettempdir(), "zerocon-browser-models")))


def comfyui_version(comfyui: Path) -> str:
    """The checkout's ``__version__`` ("unknown" when it has none)."""
    try:
        text = (Path(comfyui) / "comfyui_version.py").read_text()
    except OSError:
        return "unknown"
    m = re.search(r'__version__\s*=\s*"([^"]+)"', text)
    return re.sub(r"[^0-9A-Za-z.+-]", "_", m.group(1)) if m else "unknown"


def cache_key(comfyui: Path, python: str) -> str:
    """``<ComfyUI version>-<hash>``: one entry per ComfyUI version (their files and model detection differ), so
    several checkouts sharing one cache do not rebuild each other's files."""
    h = hashlib.sha256()
    h.update((HERE / "checkpoints.py").read_bytes())
    for rel in ("comfyui_version.py", "comfy/model_detection.py", "comfy/supported_models.py"):
        try:
            h.update((Path(comfyui) / rel).read_bytes())
        except OSError:
            pass
    for rel in ("tests/comfyui/tiny_clip.py", "tests/core/tiny_vision.py", "tests/core/tiny_text.py"):
        try:
            h.update((HERE.parents[2] / rel).read_bytes())
        except OSError:
            pass
    h.update(python.encode())
    return f"{comfyui_version(comfyui)}-{h.hexdigest()[:16]}"


def _build(comfyui: Path, python: str, out: Path, kinds: list[str], log) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="build-", dir=out.parent))
    try:
        cmd = [python, str(HERE / "checkpoints.py"), "--comfyui", str(comfyui), "--out", str(tmp), *kinds]
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=str(comfyui), env=env, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(
                f"building {kinds} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
            )
        log(
            f"built {kinds} in {time.time() - t0:.0f}s: "
            + " | ".join(ln for ln in proc.stdout.splitlines() if ln.startswith("{"))
        )
        out.mkdir(parents=True, exist_ok=True)
        for item in tmp.iterdir():
            dest = out / item.name
            if dest.exists():
                shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
            os.replace(item, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _prune(root: Path, keep: str, log) -> None:
    """Remove stale cache entries (each holds ~3 GB): older builds for the same ComfyUI version as ``keep``, and
    entries named by a bare hash (before the version was part of the name). Other versions' entries stay."""
    version = keep.rsplit("-", 1)[0]
    for entry in root.iterdir():
        if not entry.is_dir() or entry.name == keep:
            continue
        same_version = entry.name.rsplit("-", 1)[0] == version and re.fullmatch(r".+-[0-9a-f]{16}", entry.name)
        if same_version or re.fullmatch(r"[0-9a-f]{16}", entry.name):
            log(f"removing stale model cache {entry}")
            shutil.rmtree(entry, ignore_errors=True)


def prepare(base: Path, comfyui: Path, python: str, kinds=("sd15", "sdxl"), log=print) -> dict:
    """Put the checkpoints of ``kinds`` and the tiny model folders into ``base/models``; returns what was used."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    out = root / cache_key(comfyui, python)
    executed = [k for k in kinds if k in checkpoints.FILE_NAMES]  # Flux is only validated: placeholders below
    want = [k for k in executed if not (out / checkpoints.FILE_NAMES[k]).is_file()]
    if not all((out / rel / "config.json").is_file() for rel in checkpoints.TINY_FOLDERS.values()):
        want.append("tiny")
    if want:
        _prune(root, keep=out.name, log=log)
        log(f"building model files {want} into {out} (cached for later runs)")
        _build(comfyui, python, out, want, log)
    else:
        log(f"model files from cache {out}")
    models = base / "models"
    (models / "checkpoints").mkdir(parents=True, exist_ok=True)
    used = {}
    for k in executed:
        name = checkpoints.FILE_NAMES[k]
        link = models / "checkpoints" / name
        if not link.exists():
            link.symlink_to(out / name)
        used[k] = str(link)
    if "flux" in kinds:  # the Flux workflow is loaded and validated, never queued: empty files under its names
        for name, folder in checkpoints.FLUX_FILES.items():
            (models / folder).mkdir(parents=True, exist_ok=True)
            (models / folder / name).touch()
        used["flux"] = "placeholders (validated only)"
    for k, rel in checkpoints.TINY_FOLDERS.items():
        dest = models / rel
        if not dest.exists():
            shutil.copytree(out / rel, dest)
        used[k] = str(dest)
    return used


def write_input_image(base: Path, name: str = "example.png", size=(96, 80)) -> Path:
    """A smooth synthetic RGB image (not square, so the crop is exercised) in the temp ComfyUI's input/."""
    import numpy as np
    from PIL import Image

    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack(
        [
            0.5 + 0.5 * np.sin(x / 9.0),
            0.5 + 0.5 * np.cos(y / 7.0),
            0.5 + 0.5 * np.sin((x + y) / 13.0),
        ],
        axis=-1,
    )
    path = base / "input" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((img * 255).round().astype("uint8")).save(path)
    return path
