"""Drive ComfyUI's real frontend in Debian's headless Chromium through Playwright (no browser download).

``Frontend(url)`` opens the page in a fresh profile, waits until the app has registered the node
definitions, and injects ``page.js`` (helpers that only use ``window.app`` / ``window.LiteGraph`` /
``app.api``). Chromium runs with the flags a closed network needs (no background networking, no
component updates, no QUIC, no sync) and a throw-away ``--user-data-dir``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
# Playwright adds --headless itself (headless=True).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
# The page is ready when the app exists and the server's node definitions are registered in LiteGraph.
READY_JS = (
    "() => !!(window.app && window.app.graph && window.app.canvas && window.LiteGraph && "
    "window.LiteGraph.registered_node_types && window.LiteGraph.registered_node_types['CheckpointLoaderSimple'] && "
    "window.app.extensionManager && window.app.extensionManager.command)"
)


def find_chromium() -> str | None:
    env = os.environ.get("ZEROCON_CHROMIUM")
    for path in ([env] if env else []) + list(CHROMIUM_CANDIDATES):
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def playwright_available() -> str | None:
    """None when the ``playwright`` package imports, else the reason."""
    try:
        import playwright.sync_api  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"the Python package 'playwright' is not importable ({exc}); pip install playwright"
    return None


class Frontend:
    def __init__(self, url: str, chromium: str | None = None, viewport=(1600, 1000), log_path: Path | None = None):
        from playwright.sync_api import sync_playwright

        self.url = url
        self.chromium = chromium or find_chromium()
        if not self.chromium:
            raise RuntimeError(f"no Chromium found (looked at {CHROMIUM_CANDIDATES}); apt-get install -y chromium")
        self.profile = tempfile.mkdtemp(prefix="zerocon-chromium-")
        self.console: list[str] = []
        self.page_errors: list[str] = []
        self.log_path = log_path
        self._pw = sync_playwright().start()
        try:
            self.context = self._pw.chromium.launch_persistent_context(
                self.profile,
                executable_path=self.chromium,
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": viewport[0], "height": viewport[1]},
                device_scale_factor=1,
            )
            self.page = self.context.pages[0] if self.context.pages else self.context.new_page()
            self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
            self.page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        except Exception:
            self._pw.stop()
            shutil.rmtree(self.profile, ignore_errors=True)
            raise

    def open(self, timeout_s: float = 180.0) -> "Frontend":
        self.page.goto(self.url + "/", wait_until="domcontentloaded", timeout=timeout_s * 1000)
        self.page.wait_for_function(READY_JS, timeout=timeout_s * 1000, polling=250)
        self.page.evaluate((HERE / "page.js").read_text())
        self.page.wait_for_function("() => !!window.__zc", timeout=10000)
        return self

    def reload(self, timeout_s: float = 180.0) -> "Frontend":
        """A fresh page (state of the previous graphs gone: e.g. an image preview loading late resizes the node that
        has its id in the next graph)."""
        return self.open(timeout_s)

    def close(self) -> None:
        try:
            if self.log_path is not None:
                self.log_path.write_text("\n".join(self.console + ["--- page errors ---"] + self.page_errors))
        except OSError:
            pass
        try:
            self.context.close()
        finally:
            self._pw.stop()
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Frontend":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ calls into page.js
    def js(self, expr: str, arg=None):
        return self.page.evaluate(expr, arg)

    def load(self, workflow: dict) -> dict:
        return self.js("(g) => window.__zc.load(g)", workflow)

    def state(self) -> dict:
        return self.js("() => window.__zc.state()")

    def serialize(self) -> dict:
        return self.js("() => window.__zc.serialize()")

    def export_workflow(self) -> str:
        return self.js("() => window.__zc.exportWorkflow()")

    def set_widgets(self, changes: list[dict]) -> list[dict]:
        return self.js("(c) => window.__zc.setWidgets(c)", changes)

    def set_modes(self, changes: list[dict]) -> list[dict]:
        return self.js("(c) => window.__zc.setModes(c)", changes)

    def refresh_combos(self) -> None:
        self.js("() => window.__zc.refreshCombos()")

    def to_prompt(self) -> dict:
        """The API-format prompt ``graphToPrompt`` makes of the loaded graph (not queued)."""
        return self.js("() => window.__zc.prompt()")

    def queue(self) -> dict:
        return self.js("() => window.__zc.queue()")

    def build(self, spec: dict) -> dict:
        return self.js("(s) => window.__zc.build(s)", spec)

    def measure(self, spec: dict, result_types, sample: str) -> dict:
        """{node key: {"canvas": [w, h], "canvasResult": [w, h], "vueResult"?: [w, h]}} (``page.js::measure``)."""
        return self.js("(a) => window.__zc.measure(a[0], a[1], a[2])", [spec, list(result_types), sample])

    def vue_available(self) -> bool:
        """Whether this frontend has the Vue "Nodes 2.0" renderer (its setting ``Comfy.VueNodes.Enabled``)."""
        return bool(self.js("() => window.__zc.vueAvailable()"))

    def set_renderer(self, which: str) -> bool:
        """``"vue"`` or ``"canvas"``; returns whether that renderer is now on (False: no Vue renderer here), once
        the nodes' sizes and the page's resources (lazily loaded widget components) have settled."""
        return bool(self.js("(w) => window.__zc.setRenderer(w)", which))

    def node_boxes(self) -> list[dict]:
        return self.js("() => window.__zc.nodeBoxes()")

    def overlaps(self, tol: float = 1.0) -> list[dict]:
        """Pairs of nodes whose boxes intersect (from the DOM under Vue, from the graph on the canvas)."""
        return self.js("(t) => window.__zc.overlaps(t)", tol)

    def result_boxes(self) -> list[dict]:
        """The text result boxes of web/zerocon_text.js: [{id, type, label, text, visible, inNode}]."""
        return self.js("() => window.__zc.resultBoxes()")

    def simulate_results(self, types, text: str) -> list:
        return self.js("(a) => window.__zc.simulateResults(a[0], a[1])", [list(types), text])

    def center_on(self, node_id, scale: float = 1.0) -> None:
        self.js("(a) => window.__zc.centerOn(a[0], a[1])", [node_id, scale])

    def text_around(self, needles: list[str]) -> str | None:
        """The text of the smallest visible element holding every one of ``needles``."""
        return self.js("(n) => window.__zc.textAround(n)", list(needles))

    def close_overlays(self) -> None:
        self.js("() => window.__zc.closeOverlays()")

    def fit_view(self) -> None:
        self.js("() => window.__zc.fitView()")

    def screenshot(self, path: Path, canvas_only: bool = True) -> None:
        self.close_overlays()
        try:  # a closed dialog fades out: wait until it is gone, so it does not show in the picture
            self.page.locator(".p-dialog-mask, .p-dialog").first.wait_for(state="hidden", timeout=5000)
        except Exception:  # still there after 5 s: take the picture anyway
            pass
        if canvas_only:
            el = self.page.locator("#graph-canvas")
            if el.count():
                el.first.screenshot(path=str(path))
                return
        self.page.screenshot(path=str(path))


def dumps(obj) -> str:
    return json.dumps(obj, indent=1, default=str)[:4000]
