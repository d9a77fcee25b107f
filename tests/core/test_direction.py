"""zerocon_core.text.direction: sentence-bank / prompt directions, templates, apply, save/load, CLIP encoders."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest
import torch

from zerocon_core.text import direction as D
from zerocon_core.text.direction import EditDirection

try:
    from .tiny_text import tiny_clip
except ImportError:  # tests/core collected without a package
    from tiny_text import tiny_clip


# ---------------------------------------------------------------------------------------------------------
# a fake host encoder: a fixed random (77, D) embedding per text


def _text_embedding(text: str, width: int, pooled_width: int | None):
    g = torch.Generator().manual_seed(zlib.crc32(text.encode()))
    e = torch.randn(77, width, generator=g)
    p = torch.randn(pooled_width, generator=g) if pooled_width else None
    return e, p


class FakeEncoder:
    def __init__(self, width=768, pooled_width=None):
        self.width, self.pooled_width = width, pooled_width
        self.batches = []

    def __call__(self, texts):
        self.batches.append(len(texts))
        out = [_text_embedding(t, self.width, self.pooled_width) for t in texts]
        emb = torch.stack([e for e, _ in out])
        pooled = torch.stack([p for _, p in out]) if self.pooled_width else None
        return emb, pooled


SRC = ["a photo of a cat", "a cat on a couch", "a small cat in the grass", "a cat sleeping"]
TGT = ["a photo of a dog", "a dog on a couch", "a dog running", "a large dog", "a dog with a ball"]


def _mean64(texts, width, pooled_width=None):
    embs = [_text_embedding(t, width, pooled_width) for t in texts]
    e = sum(x.double() for x, _ in embs) / len(texts)
    p = sum(y.double() for _, y in embs) / len(texts) if pooled_width else None
    return e, p


def test_sentence_bank_direction_is_mean_difference():
    enc = FakeEncoder(768)
    d = D.sentence_bank_direction(enc, SRC, TGT, "cat", "dog", batch_size=2)
    expected = _mean64(TGT, 768)[0] - _mean64(SRC, 768)[0]
    assert list(d.deltas) == ["l"] and d.width == 768 and d.length == 77
    assert d.delta.dtype == torch.float32 and d.delta.shape == (77, 768)
    torch.testing.assert_close(d.delta.double(), expected, rtol=0, atol=1e-6)
    assert d.pooled is None
    assert (d.source, d.target, d.mode, d.num_source, d.num_target) == ("cat", "dog", "sentences", 4, 5)
    assert max(enc.batches) <= 2
    # batching does not change the result
    d2 = D.sentence_bank_direction(FakeEncoder(768), SRC, TGT, batch_size=100)
    torch.testing.assert_close(d2.delta, d.delta, rtol=0, atol=1e-6)


def test_sdxl_direction_splits_encoders_and_keeps_pooled():
    d = D.sentence_bank_direction(FakeEncoder(2048, 1280), SRC, TGT, "cat", "dog")
    assert d.encoders == (("l", 768), ("g", 1280)) and d.width == 2048
    (e_t, p_t), (e_s, p_s) = _mean64(TGT, 2048, 1280), _mean64(SRC, 2048, 1280)
    torch.testing.assert_close(d.deltas["l"].double(), (e_t - e_s)[:, :768], rtol=0, atol=1e-6)
    torch.testing.assert_close(d.deltas["g"].double(), (e_t - e_s)[:, 768:], rtol=0, atol=1e-6)
    torch.testing.assert_close(d.pooled.double(), p_t - p_s, rtol=0, atol=1e-6)
    torch.testing.assert_close(d.delta.double(), e_t - e_s, rtol=0, atol=1e-6)


def test_explicit_encoder_split_and_bad_split():
    d = D.sentence_bank_direction(FakeEncoder(64), SRC, TGT, encoders=[("a", 24), ("b", 40)])
    assert d.encoders == (("a", 24), ("b", 40))
    with pytest.raises(ValueError, match="does not add up"):
        D.sentence_bank_direction(FakeEncoder(64), SRC, TGT, encoders=[("a", 24)])


def test_prompt_difference_direction():
    d = D.prompt_difference_direction(FakeEncoder(1024), "a cat on a couch", "a dog on a couch")
    expected = (
        _text_embedding("a dog on a couch", 1024, None)[0].double()
        - _text_embedding("a cat on a couch", 1024, None)[0].double()
    )
    torch.testing.assert_close(d.delta.double(), expected, rtol=0, atol=1e-6)
    assert d.mode == "prompt" and d.encoders == (("h", 1024),)
    assert (d.num_source, d.num_target) == (1, 1)


def test_empty_sentence_lists_and_bad_encode():
    enc = FakeEncoder(768)
    with pytest.raises(ValueError, match="source sentence list is empty"):
        D.sentence_bank_direction(enc, [], TGT)
    with pytest.raises(ValueError, match="target sentence list is empty"):
        D.sentence_bank_direction(enc, SRC, [])
    with pytest.raises(TypeError, match="single string"):
        D.sentence_bank_direction(enc, "a cat", TGT)
    with pytest.raises(ValueError, match=r"\(N, 77, D\)"):
        D.sentence_bank_direction(lambda t: (torch.zeros(len(t), 768), None), SRC, TGT)
    lengths = iter([77, 154, 77, 77])
    with pytest.raises(ValueError, match="same token length"):
        D.sentence_bank_direction(lambda t: (torch.zeros(len(t), next(lengths), 8), None), SRC, TGT, batch_size=2)


# ---------------------------------------------------------------------------------------------------------
# apply


def _direction(width=768, pooled=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    enc = D.default_encoders(width)
    deltas = {k: torch.randn(77, w, generator=g) for k, w in enc}
    p = torch.randn(pooled, generator=g) if pooled else None
    return EditDirection(deltas=deltas, pooled=p, source="cat", target="dog", num_source=3, num_target=4)


def test_apply_strength_zero_is_identity():
    d = _direction(2048, 1280)
    cond, pooled = torch.randn(2, 77, 2048), torch.randn(2, 1280)
    c0, p0 = cond.clone(), pooled.clone()
    out, out_p = D.apply_direction(cond, d, 0.0, pooled=pooled)
    assert torch.equal(out, c0) and torch.equal(out_p, p0)
    assert torch.equal(D.apply_direction(cond, d, 0), c0)
    assert torch.equal(cond, c0) and torch.equal(pooled, p0)  # inputs untouched


def test_apply_adds_delta_to_every_chunk():
    d = _direction(768)
    cond = torch.randn(2, 154, 768)
    out = D.apply_direction(cond, d, 0.7)
    delta = d.delta.double()
    for b in range(2):
        torch.testing.assert_close(out[b, :77].double(), cond[b, :77].double() + 0.7 * delta, rtol=0, atol=1e-5)
        torch.testing.assert_close(out[b, 77:].double(), cond[b, 77:].double() + 0.7 * delta, rtol=0, atol=1e-5)
    out2d = D.apply_direction(cond[0], d, 0.7)
    torch.testing.assert_close(out2d, out[0])


def test_apply_pooled_dtype_and_missing_pooled():
    d = _direction(2048, 1280)
    cond, pooled = torch.randn(1, 77, 2048, dtype=torch.float16), torch.randn(1, 1280, dtype=torch.float16)
    out, out_p = D.apply_direction(cond, d, 1.5, pooled=pooled)
    assert out.dtype == torch.float16 and out_p.dtype == torch.float16
    torch.testing.assert_close(out_p.float(), pooled.float() + 1.5 * d.pooled, rtol=1e-3, atol=1e-2)
    # SD1 direction without a pooled delta: pooled passes through unchanged
    d1 = _direction(768)
    _, p1 = D.apply_direction(torch.randn(1, 77, 768), d1, 1.0, pooled=torch.ones(1, 768))
    assert torch.equal(p1, torch.ones(1, 768))


def test_apply_width_mismatch_message():
    with pytest.raises(ValueError) as e:
        D.apply_direction(torch.zeros(1, 77, 2048), _direction(768), 1.0)
    msg = str(e.value)
    assert "it is 768 wide" in msg and "SD1.x" in msg and "2048 wide" in msg and "SDXL" in msg


def test_apply_length_not_multiple():
    with pytest.raises(ValueError, match="not a multiple"):
        D.apply_direction(torch.zeros(1, 100, 768), _direction(768), 1.0)


# ---------------------------------------------------------------------------------------------------------
# save / load


def test_save_load_round_trip(tmp_path):
    d = _direction(2048, 1280)
    d.extra["model"] = "sdxl-base"
    path = tmp_path / "sub" / "cat_to_dog.safetensors"
    D.save_direction(path, d)
    back = D.load_direction(path)
    assert list(back.deltas) == list(d.deltas)
    for k in d.deltas:
        assert torch.equal(back.deltas[k], d.deltas[k]) and back.deltas[k].dtype == d.deltas[k].dtype
    assert torch.equal(back.pooled, d.pooled)
    for attr in ("source", "target", "mode", "num_source", "num_target", "extra", "encoders", "width"):
        assert getattr(back, attr) == getattr(d, attr), attr
    assert os.listdir(path.parent) == ["cat_to_dog.safetensors"]  # no temp files left
    # SD1 without pooled, prompt mode
    d1 = EditDirection(
        deltas={"l": torch.randn(77, 768)}, source="a cat", target="a dog", mode="prompt", num_source=1, num_target=1
    )
    D.save_direction(tmp_path / "p.safetensors", d1)
    b1 = D.load_direction(tmp_path / "p.safetensors")
    assert b1.pooled is None and b1.mode == "prompt" and torch.equal(b1.delta, d1.delta)


def test_save_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "d.safetensors"
    D.save_direction(path, _direction(768, seed=1))
    before = path.read_bytes()

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        D.save_direction(path, _direction(768, seed=2))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["d.safetensors"]


def test_load_errors(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        D.load_direction(missing)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(ValueError, match="not an edit direction file"):
        D.load_direction(junk)
    from safetensors.torch import save_file

    other = tmp_path / "lora.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not an edit direction file"):
        D.load_direction(other)
    future = tmp_path / "future.safetensors"
    save_file(
        {"delta.l": torch.zeros(77, 8)},
        str(future),
        metadata={"format": D.FORMAT, "format_version": "99", "encoders": '[["l", 8]]'},
    )
    with pytest.raises(ValueError, match="version"):
        D.load_direction(future)


# ---------------------------------------------------------------------------------------------------------
# sentences


@pytest.mark.parametrize("word", ["cat", "oil painting", "elephant"])
def test_template_sentences(word):
    s = D.template_sentences(word, n=300, seed=0)
    assert len(s) == 300 and len(set(s)) == 300
    assert all(word in x for x in s)
    assert s == D.template_sentences(word, n=300, seed=0)
    assert s != D.template_sentences(word, n=300, seed=1)
    assert len(D.template_sentences(word, n=1000)) == 1000
    # varied: many different structures/backgrounds, not one pattern
    assert len({x.split(word)[0] for x in s}) > 30
    assert not any(" a elephant" in x or " a adj" in x or "{" in x for x in s)
    with pytest.raises(ValueError):
        D.template_sentences("  ")


def test_template_banks_are_paired():
    cats, dogs = D.template_sentences("cat", 200, seed=4), D.template_sentences("dog", 200, seed=4)
    assert [s.replace("cat", "dog").replace("Cat", "Dog") for s in cats] == dogs


def test_parse_sentence_list():
    text = "# cats\na cat on a couch\n\n   a   small cat  \n#comment\n\t\na cat in the snow\n"
    assert D.parse_sentence_list(text) == ["a cat on a couch", "a small cat", "a cat in the snow"]
    assert D.parse_sentence_list("") == []


# ---------------------------------------------------------------------------------------------------------
# transformers CLIP encoders (tiny models, written by the test)


def _encode_one(tok, model, text, penultimate=False):
    ids = tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.double()(ids, output_hidden_states=True)
    model.float()
    h = out.hidden_states[-2] if penultimate else out.last_hidden_state
    return h[0], getattr(out, "text_embeds", None)


def test_clip_encoder_direction_matches_direct_float64(tmp_path):
    tok, model = tiny_clip(tmp_path / "tok", hidden=32)
    enc = D.clip_encoder(tok, model, "cpu", batch_size=3)
    emb, pooled = enc(SRC)
    assert emb.shape == (4, 77, 32) and pooled is None
    d = D.sentence_bank_direction(enc, SRC, TGT, "cat", "dog", batch_size=2)
    mean = lambda texts: sum(_encode_one(tok, model, t)[0] for t in texts) / len(texts)  # noqa: E731
    torch.testing.assert_close(d.delta.double(), mean(TGT) - mean(SRC), rtol=0, atol=1e-5)
    assert d.encoders == (("l", 32),)


def test_sdxl_clip_encoder_matches_diffusers_recipe(tmp_path):
    tok1, m1 = tiny_clip(tmp_path / "t1", hidden=32, seed=1)
    tok2, m2 = tiny_clip(tmp_path / "t2", hidden=48, projection=24, pad_token="!", seed=2)
    enc = D.sdxl_clip_encoder(tok1, m1, tok2, m2, "cpu")
    assert enc.encoders == (("l", 32), ("g", 48))
    d = D.sentence_bank_direction(enc, SRC, TGT, "cat", "dog")
    assert d.width == 80 and d.pooled.shape == (24,)

    def mean(texts):
        hs, ps = [], []
        for t in texts:
            h1, _ = _encode_one(tok1, m1, t, penultimate=True)
            h2, p2 = _encode_one(tok2, m2, t, penultimate=True)
            hs.append(torch.cat([h1, h2], -1))
            ps.append(p2[0])
        return sum(hs) / len(hs), sum(ps) / len(ps)

    (e_t, p_t), (e_s, p_s) = mean(TGT), mean(SRC)
    torch.testing.assert_close(d.delta.double(), e_t - e_s, rtol=0, atol=1e-5)
    torch.testing.assert_close(d.pooled.double(), p_t - p_s, rtol=0, atol=1e-5)


def test_import_is_cheap():
    code = (
        "import sys, zerocon_core.text.direction, zerocon_core.text.captioning; "
        "bad = [m for m in ('transformers', 'diffusers', 'safetensors', 'comfy') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sentence_bank_settings_object_and_old_keywords_agree():
    old = D.sentence_bank_direction(FakeEncoder(768), SRC, TGT, "cat", "dog", batch_size=2)
    enc = FakeEncoder(768)
    new = D.sentence_bank_direction(enc, SRC, TGT, "cat", "dog", bank=D.BankSettings(batch_size=2))
    assert enc.batches == [2, 2, 2, 2, 1]
    assert new.source == "cat" and new.target == "dog"
    assert all(torch.equal(new.deltas[k], old.deltas[k]) for k in old.deltas)
    positional = D.sentence_bank_direction(FakeEncoder(768), SRC, TGT, "cat", "dog", 2)
    assert all(torch.equal(positional.deltas[k], old.deltas[k]) for k in old.deltas)
    with pytest.raises(TypeError, match="unexpected keyword argument 'batch'"):
        D.sentence_bank_direction(FakeEncoder(768), SRC, TGT, batch=2)
