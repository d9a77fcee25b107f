"""ZeroCon Edit Direction with ComfyUI CLIPs: progress (node bar + console), Cancel, the per-CLIP embedding cache,
and the text shown on the node."""

from __future__ import annotations

import comfy.model_management
import comfy.utils
import pytest
import tiny_clip
import torch
from conftest import pack_fixture

dn = pack_fixture("nodes.classes.direction_nodes")


@pytest.fixture
def cache(dn):
    dn.BANK_CACHE.clear()
    yield dn.BANK_CACHE
    dn.BANK_CACHE.clear()


@pytest.fixture
def ui_updates(monkeypatch):
    """Every (value, total) that reached ComfyUI's progress-bar hook (what the frontend's node bar shows).

    Newer ComfyUI's ``ProgressBar`` drops updates less than 0.1 s after the last one it sent (first, final and
    preview updates always go through): its throttle is turned off here, so the list holds every update the
    node makes whatever the speed of the machine."""
    for name in ("PROGRESS_THROTTLE_MIN_INTERVAL", "PROGRESS_THROTTLE_MIN_PERCENT"):
        if hasattr(comfy.utils, name):
            monkeypatch.setattr(comfy.utils, name, 0)
    seen = []
    saved = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    yield seen
    comfy.utils.set_progress_bar_global_hook(saved)


class CountCalls:
    """Counts ``encode_from_tokens`` calls on one CLIP object (the only way the node encodes sentences)."""

    def __init__(self, clip, monkeypatch):
        self.calls = 0
        original = clip.encode_from_tokens

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(clip, "encode_from_tokens", counted)


def direction(dn, clip, target="dog", n=6, batch_size=4):
    with torch.inference_mode():
        return dn.ZeroConEditDirection.execute(
            clip=clip, source="cat", target=target, mode="sentence bank", num_sentences=n, batch_size=batch_size
        )


def test_progress_on_the_node_and_in_the_console(dn, cache, ui_updates, capsys):
    direction(dn, tiny_clip.clip("sd1", seed=3), n=6, batch_size=4)
    # 12 sentences in batches of 4 per side: 6 = 4 + 2 source, then 4 + 2 target
    assert ui_updates == [(0, 12), (4, 12), (6, 12), (10, 12), (12, 12)]
    err = capsys.readouterr().err
    assert "ZeroCon Edit Direction" in err and "12/12" in err


def test_cancel_stops_encoding(dn, cache, monkeypatch):
    clip = tiny_clip.clip("sd1", seed=3)
    counter = CountCalls(clip, monkeypatch)
    comfy.model_management.interrupt_current_processing(True)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        direction(dn, clip)
    assert counter.calls == 0


def test_second_direction_with_the_same_clip_does_not_encode(dn, cache, monkeypatch):
    clip = tiny_clip.clip("sd1", seed=3)
    first = direction(dn, clip).args[0]
    counter = CountCalls(clip, monkeypatch)
    again = direction(dn, clip).args[0]
    assert counter.calls == 0
    torch.testing.assert_close(again.delta, first.delta, rtol=0, atol=0)
    assert again.encoders == first.encoders
    # the same source with another target: only the target side is encoded (6 sentences, 2 batches)
    other = direction(dn, clip, target="horse").args[0]
    assert counter.calls == 2 and other.target == "horse"
    assert len(cache) == 3


def test_another_clip_layer_or_model_misses_the_cache(dn, cache, monkeypatch):
    clip = tiny_clip.clip("sd1", seed=3)
    base = direction(dn, clip).args[0]

    skip = clip.clone()
    skip.clip_layer(-2)  # what CLIP Set Last Layer does
    counter = CountCalls(skip, monkeypatch)
    layered = direction(dn, skip).args[0]
    assert counter.calls == 4
    assert not torch.equal(layered.delta, base.delta)

    other = tiny_clip.clip("sd1", seed=5)
    counter = CountCalls(other, monkeypatch)
    direction(dn, other)
    assert counter.calls == 4


def test_lora_style_patches_miss_the_cache(dn, cache, monkeypatch):
    clip = tiny_clip.clip("sd1", seed=3)
    direction(dn, clip)
    patched = clip.clone()
    weights = patched.patcher.model.state_dict()
    key = next(k for k in weights if k.endswith("fc1.weight"))
    patched.add_patches({key: (0.1 * torch.randn_like(weights[key]),)}, 1.0)  # a LoRA adds patches like this
    counter = CountCalls(patched, monkeypatch)
    direction(dn, patched)
    assert counter.calls == 4


def test_the_node_shows_the_direction(dn, cache):
    out = direction(dn, tiny_clip.clip("sd1", seed=3))
    assert out.ui.as_dict() == {"text": (out.args[0].describe(),)}
    assert "'cat' -> 'dog'" in out.ui.as_dict()["text"][0]
