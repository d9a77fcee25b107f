"""Start and stop a real ComfyUI server (``main.py --cpu``) with this pack, isolated in a temporary base directory.

``--base-directory`` moves models/, custom_nodes/, input/, output/, temp/ and user/ to the temp folder and
``--database-url`` the SQLite file, so nothing is written into the ComfyUI checkout (bytecode writing is
off too). The pack is a symlink ``custom_nodes/ComfyUI-ZeroCon -> <repo>``: ComfyUI imports it as it
imports any custom node folder. The server listens on 127.0.0.1 only, on a free port, and ``stop()``
kills its whole process group.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

PACK_FOLDER = "ComfyUI-ZeroCon"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_base(base: Path, repo: Path, settings_extra: dict | None = None) -> Path:
    """The temp ComfyUI base directory: the pack symlinked into custom_nodes, empty model / io folders, and
    user settings that skip the first-run template dialog and do not restore the last workflow on a reload."""
    for sub in ("custom_nodes", "models/checkpoints", "input", "output", "temp", "user/default"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_FOLDER
    if not link.exists():
        link.symlink_to(repo, target_is_directory=True)
    settings = base / "user" / "default" / "comfy.settings.json"
    if not settings.exists():
        settings.write_text(
            json.dumps(
                {
                    "Comfy.TutorialCompleted": True,
                    "Comfy.InstalledVersion": "1.27.10",
                    "Comfy.Validation.Workflows": True,
                    "Comfy.Workflow.ShowMissingNodesWarning": True,
                    "Comfy.Workflow.ShowMissingModelsWarning": True,
                    # A reloaded page starts from the default graph: no restored workflow replaces the one a test
                    # loads right after the reload.
                    "Comfy.Workflow.Persist": False,
                    **(settings_extra or {}),
                }
            )
        )
    return base


class ComfyServer:
    def __init__(
        self,
        comfyui: Path,
        python: str,
        base: Path,
        port: int | None = None,
        extra_args=(),
        env=None,
        legacy: bool = False,
    ):
        """``legacy``: a ComfyUI older than --database-url (its database then lives in the temp base's user/)."""
        self.comfyui = Path(comfyui)
        self.python = python
        self.base = Path(base)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / "comfyui.log"
        self.extra_args = list(extra_args)
        self.env = env or {}
        self.legacy = legacy
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self, timeout: float = 240.0) -> "ComfyServer":
        cmd = [
            self.python,
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--base-directory",
            str(self.base),
            "--disable-auto-launch",
            *(
                []
                if self.legacy
                else ["--database-url", f"sqlite:///{self.base / 'comfyui.db'}", "--preview-method", "none"]
            ),
            *self.extra_args,
        ]
        env = dict(os.environ)
        env.update(
            {
                "PYTHONDONTWRITEBYTECODE": "1",  # the ComfyUI checkout stays untouched
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "DO_NOT_TRACK": "1",
                "OMP_NUM_THREADS": env.get("ZEROCON_SERVER_THREADS", "2"),
            }
        )
        env.update(self.env)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            cmd, cwd=self.comfyui, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=5) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer on {self.url} within {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=20)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, chars: int = 8000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # ------------------------------------------------------------------ HTTP
    def get(self, path: str, timeout: float = 30.0):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read().decode())

    def wait_history(self, prompt_id: str, timeout: float, poll: float = 1.0, progress=None) -> dict:
        """The /history entry of ``prompt_id`` once it has finished (success or error)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            hist = self.get(f"/history/{prompt_id}")
            entry = hist.get(prompt_id)
            if (
                entry
                and entry.get("status", {}).get("completed") is not None
                and (entry["status"].get("completed") or entry["status"].get("status_str") == "error")
            ):
                return entry
            if progress:
                progress()
            time.sleep(poll)
        try:
            urllib.request.urlopen(urllib.request.Request(self.url + "/interrupt", method="POST"), timeout=10)
        except Exception:  # noqa: BLE001 - best effort
            pass
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f}s:\n{self.log_tail()}")


def history_errors(entry: dict) -> list[str]:
    """Readable execution errors of a /history entry ("" list when it succeeded)."""
    out = []
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind in ("execution_error", "execution_interrupted"):
            out.append(
                f"{kind}: node {data.get('node_id')} ({data.get('node_type')}): "
                f"{data.get('exception_type', '')}: {data.get('exception_message', '')}".strip()
            )
    return out


if __name__ == "__main__":  # pragma: no cover - manual use: python tests/comfyui/browser/comfy_server.py
    import tempfile

    repo = Path(__file__).resolve().parents[3]
    comfy = Path(os.environ.get("COMFYUI_PATH", str(Path.home() / "ComfyUI"))).expanduser()
    base = make_base(Path(tempfile.mkdtemp(prefix="zerocon-comfy-")), repo)
    with ComfyServer(comfy, sys.executable, base) as s:
        print(f"ComfyUI at {s.url} (base {base}); Ctrl+C stops it", flush=True)
        try:
            while s.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
