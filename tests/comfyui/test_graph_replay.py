"""The reference record through ComfyUI's executor and its node-output cache.

The pix2pix-zeroCon graph of test_graph.py with the guidance also wired into DDIM Inversion, queued on one
``PromptExecutor`` (so its CLASSIC cache persists between prompts, as in a running server): re-queueing with
only the edit prompt changed re-runs the sampler and not the inversion, and the sampler replays the cached
inversion's record. A stock KSampler on the same cached MODEL gives bit-identical results before and after.
"""

from __future__ import annotations

import asyncio
import copy
import json
import sys
import uuid

import pytest
import torch
from test_graph import ServerStub, build_graph, executor_env, prompt_executor  # noqa: F401  (executor_env: the fixture)


def _stock(prompt: dict, seed: int) -> dict:
    """Add a stock KSampler on the graph's checkpoint (fixed prompts, empty latent) and its capture."""
    prompt = copy.deepcopy(prompt)
    prompt["ks_pos"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a dog", "clip": ["ckpt", 1]}}
    prompt["ks_neg"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}}
    prompt["ks_latent"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    prompt["ks"] = {
        "class_type": "KSampler",
        "inputs": {
            "model": ["ckpt", 0],
            "seed": seed,
            "steps": 3,
            "cfg": 4.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "positive": ["ks_pos", 0],
            "negative": ["ks_neg", 0],
            "latent_image": ["ks_latent", 0],
            "denoise": 1.0,
        },
    }
    prompt["cap_ks"] = {"class_type": "ZeroConTest_Capture", "inputs": {"value": ["ks", 0], "key": "ks"}}
    return prompt


def _queue(executor, prompt: dict) -> set[str]:
    """Run ``prompt`` on ``executor``; the ids of the nodes that executed (not served from the cache)."""
    import execution

    ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt(uuid.uuid4().hex, prompt, None))
    assert ok, json.dumps({"error": error, "node_errors": node_errors}, indent=1, default=str)
    executor.server.messages.clear()
    executor.execute(prompt, uuid.uuid4().hex, {"client_id": "zerocon-test"}, outputs)
    errors = [d for e, d in executor.status_messages if e == "execution_error"]
    assert executor.success and not errors, json.dumps(errors, indent=1, default=str)[:4000]
    return {d["node"] for e, d in executor.server.messages if e == "executing" and d.get("node")}


@pytest.fixture()
def spy(monkeypatch):
    """Every engine ``SampleResult`` the pack's guided sampler produces."""
    import nodes as comfy_nodes

    module = sys.modules[comfy_nodes.NODE_CLASS_MAPPINGS["ZeroConGuidedSampler"].__module__]
    real, results = module.guided_ddim_sample, []

    def wrapped(*args, **kwargs):
        results.append(real(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(module, "guided_ddim_sample", wrapped)
    return results


def test_requeue_with_a_new_edit_prompt_replays_the_cached_record(executor_env, spy):  # noqa: F811
    captured = executor_env
    graph = build_graph("sd15")
    graph["invert"]["inputs"]["guidance"] = ["nce", 0]
    executor = prompt_executor(ServerStub())

    ran = _queue(executor, _stock({"ckpt": graph["ckpt"]}, seed=7))
    assert "ks" in ran
    before = captured["ks"]["samples"].clone()

    ran = _queue(executor, _stock(graph, seed=8))
    assert {"invert", "sample"} <= ran
    first = captured["edit"].clone()
    assert spy[-1].reference_mode == "inverted" and spy[-1].replayed == [1, 2]

    graph["direction"]["inputs"]["target"] = "horse"  # only the edit prompt changes
    ran = _queue(executor, _stock(graph, seed=8))
    assert "sample" in ran and "edited" in ran
    assert "invert" not in ran and "latent" not in ran and "ks" not in ran
    assert len(spy) == 2 and spy[-1].reference_mode == "inverted" and spy[-1].replayed == [1, 2]
    assert not torch.equal(captured["edit"], first)

    ran = _queue(executor, _stock(graph, seed=7))  # the stock KSampler again, after two guided runs
    assert "ks" in ran and "sample" not in ran
    assert torch.equal(captured["ks"]["samples"], before)
