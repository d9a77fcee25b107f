"""A whole pix2pix-zeroCon graph runs through ComfyUI's own executor, in-process and in a real server.

BLIP caption -> CLIP Text Encode -> Edit Direction -> Apply -> VAE Encode -> DDIM Inversion ->
cross-attention + PatchNCE guidance -> Guided Sampler -> VAE Decode, as an API-format prompt:

- in-process: ``execution.validate_prompt`` + ``execution.PromptExecutor`` (what ComfyUI's prompt worker
  runs) with a stub in place of the PromptServer; SD1.5- and SDXL-shaped tiny models;
- server: ``main.py --cpu`` in a subprocess on 127.0.0.1 (free port, temporary base directory whose
  ``custom_nodes/`` links to this repository and to the test-only node pack), ``/object_info`` checked
  and the same graph queued over HTTP, results read from ``/history``.

Tiny seeded models enter the graph through the TEST-ONLY pack ``testing_nodes`` (ZeroConTest_*); the BLIP
folder is a tiny transformers model written to a temporary models/blip. Nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import tiny_clip
import torch
from conftest import COMFYUI, REPO

TESTING_NODES = Path(__file__).resolve().parent / "testing_nodes"
STEPS = 3
SIZE = 64  # pixels; latent 8 x 8


def inversion_node(steps: int, regularize: bool) -> dict:
    """A DDIM Inversion node on ckpt's MODEL, the "latent" node's LATENT and the "source" conditioning."""
    inputs = {
        "model": ["ckpt", 0],
        "latent": ["latent", 0],
        "conditioning": ["source", 0],
        "steps": steps,
        "cfg": 1.0,
        "regularize": regularize,
        "lambda_ac": 20.0,
        "lambda_kl": 20.0,
        "reg_outer": 1,
        "reg_rolls": 1,
        "seed": 0,
    }
    return {"class_type": "ZeroConDDIMInversion", "inputs": inputs}


def guided_sampler_node(cfg: float, **links) -> dict:
    """A Guided Sampler node on ckpt's MODEL, the "invert" node's inversion and the "edited" conditioning (raw
    steps of 0.02, branches "edit"); ``links``: further inputs (guidance)."""
    inputs = {
        "model": ["ckpt", 0],
        "inversion": ["invert", 1],
        "edited": ["edited", 0],
        "cfg": cfg,
        "step_mode": "raw",
        "step_size": 0.02,
        "branches": "edit",
        "seed": 0,
        **links,
    }
    return {"class_type": "ZeroConGuidedSampler", "inputs": inputs}


def build_graph(kind: str = "sd15", blip: str = "tiny-blip") -> dict:
    """The API-format prompt (what the UI POSTs to /prompt)."""
    return {
        "ckpt": {"class_type": "ZeroConTest_TinyCheckpoint", "inputs": {"kind": kind, "seed": 0}},
        "image": {
            "class_type": "ZeroConTest_Image",
            "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1, "seed": 1},
        },
        "blip": {
            "class_type": "ZeroConBLIPLoader",
            "inputs": {"model": blip, "precision": "fp32", "device": "cpu", "allow_download": False},
        },
        "caption": {
            "class_type": "ZeroConBLIPCaption",
            "inputs": {
                "blip": ["blip", 0],
                "image": ["image", 0],
                "prefix": "a photography of",
                "max_new_tokens": 4,
                "min_new_tokens": 0,
                "num_beams": 1,
            },
        },
        "source": {"class_type": "CLIPTextEncode", "inputs": {"text": ["caption", 0], "clip": ["ckpt", 1]}},
        "direction": {
            "class_type": "ZeroConEditDirection",
            "inputs": {
                "clip": ["ckpt", 1],
                "source": "cat",
                "target": "dog",
                "mode": "sentence bank",
                "num_sentences": 4,
                "batch_size": 4,
                "source_sentences": "",
                "target_sentences": "",
            },
        },
        "edited": {
            "class_type": "ZeroConApplyEditDirection",
            "inputs": {"conditioning": ["source", 0], "direction": ["direction", 0], "strength": 1.0},
        },
        "latent": {"class_type": "VAEEncode", "inputs": {"pixels": ["image", 0], "vae": ["ckpt", 2]}},
        "invert": inversion_node(STEPS, regularize=True),
        "xattn": {
            "class_type": "ZeroConCrossAttentionGuidance",
            "inputs": {"weight": -1.0, "layers": "all", "start": 0.0, "end": 1.0},
        },
        "nce": {
            "class_type": "ZeroConPatchNCEGuidance",
            "inputs": {
                "weight": -1.0,
                "layers": "up",
                "patches": 16,
                "tau": 0.07,
                "patch_sizes": "1,2",
                "start": 0.0,
                "end": 1.0,
                "previous": ["xattn", 0],
            },
        },
        "sample": guided_sampler_node(5.0, guidance=["nce", 0]),
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "decode_ref": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 1], "vae": ["ckpt", 2]}},
        "cap_edit": {"class_type": "ZeroConTest_Capture", "inputs": {"value": ["decode", 0], "key": "edit"}},
        "cap_ref": {
            "class_type": "ZeroConTest_Capture",
            "inputs": {"value": ["decode_ref", 0], "key": "reconstruction"},
        },
        "cap_caption": {"class_type": "ZeroConTest_Capture", "inputs": {"value": ["caption", 0], "key": "caption"}},
        "cap_xt": {"class_type": "ZeroConTest_Capture", "inputs": {"value": ["invert", 0], "key": "x_t"}},
    }


# ------------------------------------------------------------------------------------------------ in-process


class ServerStub:
    """The part of PromptServer that execution.PromptExecutor talks to."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


@pytest.fixture(scope="module")
def executor_env(tmp_path_factory):
    import folder_paths

    import nodes as comfy_nodes

    assert asyncio.run(comfy_nodes.load_custom_node(str(REPO)))
    assert asyncio.run(comfy_nodes.load_custom_node(str(TESTING_NODES)))
    models = tmp_path_factory.mktemp("models")
    tiny_clip.save_blip(models / "blip" / "tiny-blip")
    saved = copy.deepcopy(folder_paths.folder_names_and_paths["blip"])
    folder_paths.add_model_folder_path("blip", str(models / "blip"), is_default=True)
    capture_cls = comfy_nodes.NODE_CLASS_MAPPINGS["ZeroConTest_Capture"]
    yield sys.modules[capture_cls.__module__].CAPTURED
    folder_paths.folder_names_and_paths["blip"] = saved


def prompt_executor(server):
    """``execution.PromptExecutor`` with the CLASSIC cache, as ``main.py`` builds it by default. Newer ComfyUI
    takes a ``cache_args`` dict (its ``execute`` reads the RAM headroom from it: 0 unless the cache is
    RAM_PRESSURE), older ones a ``cache_size``: pass what this version's signature names."""
    import inspect

    import execution

    if "cache_args" in inspect.signature(execution.PromptExecutor.__init__).parameters:
        cache = {"cache_args": {"lru": 0, "ram": 0, "ram_inactive": 0}}
    else:
        cache = {}
    return execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC, **cache)


def execute_in_process(prompt: dict) -> ServerStub:
    import execution

    ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt(uuid.uuid4().hex, prompt, None))
    assert ok, json.dumps({"error": error, "node_errors": node_errors}, indent=1, default=str)
    server = ServerStub()
    executor = prompt_executor(server)
    executor.execute(prompt, uuid.uuid4().hex, {"client_id": "zerocon-test"}, outputs)
    errors = [d for e, d in executor.status_messages if e == "execution_error"]
    assert executor.success and not errors, json.dumps(errors, indent=1, default=str)[:4000]
    return server


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_graph_runs_in_comfyui_executor(executor_env, kind):
    captured = executor_env
    captured.clear()
    server = execute_in_process(build_graph(kind))
    executed = {d["node"] for e, d in server.messages if e == "executing" and d.get("node")}
    assert {"caption", "direction", "edited", "invert", "sample", "decode"} <= executed

    caption = captured["caption"]
    assert isinstance(caption, str) and caption and set(caption.split()) <= set(tiny_clip.BLIP_WORDS[6:])
    edit, ref = captured["edit"], captured["reconstruction"]
    assert edit.shape == ref.shape == (1, SIZE, SIZE, 3)
    assert torch.isfinite(edit).all() and edit.min() >= 0 and edit.max() <= 1
    assert (edit - ref).abs().mean() > 0  # the edit direction changed something
    x_t = captured["x_t"]["samples"]
    assert x_t.shape == (1, 4, SIZE // 8, SIZE // 8) and torch.isfinite(x_t).all()


def test_graph_reports_a_missing_blip_folder_as_a_node_error(executor_env, monkeypatch):
    import execution

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prompt = build_graph("sd15", blip="blip-image-captioning-base")
    prompt["blip"]["inputs"]["allow_download"] = True
    ok, _, outputs, _ = asyncio.run(execution.validate_prompt("v", prompt, None))
    assert ok
    executor = prompt_executor(ServerStub())
    executor.execute(prompt, "missing-blip", {}, outputs)
    errors = [d for e, d in executor.status_messages if e == "execution_error"]
    assert not executor.success and errors and errors[0]["node_type"] == "ZeroConBLIPLoader"
    assert "Salesforce/blip-image-captioning-base" in errors[0]["exception_message"]
    assert "blip-image-captioning-base" in errors[0]["exception_message"]


# ------------------------------------------------------------------------------------------------ real server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 30):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _post(url: str, body: dict, timeout: float = 30):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise AssertionError(f"POST {url} -> {e.code}: {e.read().decode()[:4000]}") from e


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    os.symlink(REPO, base / "custom_nodes" / "ComfyUI-ZeroCon", target_is_directory=True)
    os.symlink(TESTING_NODES, base / "custom_nodes" / "zerocon_testing_nodes", target_is_directory=True)
    tiny_clip.save_blip(base / "models" / "blip" / "tiny-blip")
    for d in ("user", "temp", "output", "input"):
        (base / d).mkdir(exist_ok=True)
    port = _free_port()
    log = open(base / "server.log", "w")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [
        sys.executable,
        "main.py",
        "--cpu",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--base-directory",
        str(base),
        "--user-directory",
        str(base / "user"),
        "--temp-directory",
        str(base / "temp"),
        "--output-directory",
        str(base / "output"),
        "--input-directory",
        str(base / "input"),
        "--database-url",
        "sqlite:///:memory:",
        "--disable-auto-launch",
        "--preview-method",
        "none",
    ]
    proc = subprocess.Popen(cmd, cwd=COMFYUI, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    f"ComfyUI exited ({proc.returncode}):\n{(base / 'server.log').read_text()[-6000:]}"
                )
            try:
                _get(f"{url}/system_stats", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"ComfyUI did not start:\n{(base / 'server.log').read_text()[-6000:]}"
                    ) from None
                time.sleep(1)
        yield url, base / "server.log"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_server_object_info_lists_every_node(server):
    url, log = server
    info = _get(f"{url}/object_info", timeout=120)
    ours = {k: v for k, v in info.items() if k.startswith("ZeroCon") and not k.startswith("ZeroConTest_")}
    for node_id in (
        "ZeroConBLIPLoader",
        "ZeroConBLIPCaption",
        "ZeroConEditDirection",
        "ZeroConApplyEditDirection",
        "ZeroConSaveEditDirection",
        "ZeroConLoadEditDirection",
        "ZeroConDDIMInversion",
        "ZeroConGuidedSampler",
        "ZeroConGuider",
        "ZeroConGuidedDDIMSampler",
    ):
        assert node_id in ours, node_id
    for node_id, v in ours.items():
        assert v["python_module"] == "custom_nodes.ComfyUI-ZeroCon", (node_id, v["python_module"])
        assert v["category"] == "image/translation/zerocon"
    assert "tiny-blip" in info["ZeroConBLIPLoader"]["input"]["required"]["model"][1]["options"]
    text = log.read_text()
    assert "IMPORT FAILED" not in "\n".join(ln for ln in text.splitlines() if "ZeroCon" in ln or "zerocon" in ln), text[
        -4000:
    ]


def test_server_runs_the_graph(server):
    url, log = server
    client_id = uuid.uuid4().hex
    reply = _post(f"{url}/prompt", {"prompt": build_graph("sd15"), "client_id": client_id})
    prompt_id = reply["prompt_id"]
    deadline = time.monotonic() + 600
    while True:
        history = _get(f"{url}/history/{prompt_id}")
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            entry = history[prompt_id]
            if entry["status"]["status_str"] == "success" or entry["status"]["completed"] is False:
                break
        if time.monotonic() > deadline:
            raise AssertionError(f"graph did not finish:\n{log.read_text()[-6000:]}")
        time.sleep(1)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:6000]
    got = {}
    for node_out in entry["outputs"].values():
        for item in node_out.get("zerocon_capture", []):
            got[item["key"]] = item["items"]
    assert set(got) == {"edit", "reconstruction", "caption", "x_t"}
    (edit,) = got["edit"]
    assert edit["shape"] == [1, SIZE, SIZE, 3] and edit["finite"] and 0 <= edit["min"] <= edit["max"] <= 1
    (caption,) = got["caption"]
    assert caption["type"] == "str" and caption["text"]
