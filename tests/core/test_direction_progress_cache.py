"""zerocon_core.text.direction: progress reports, cancelling, and the per-encoder cache of sentence-bank embeddings."""

from __future__ import annotations

import zlib

import pytest
import torch

from zerocon_core.text import direction as D


def _embedding(text: str, width: int, pooled_width: int | None, salt: int = 0):
    g = torch.Generator().manual_seed(zlib.crc32(text.encode()) + salt)
    e = torch.randn(77, width, generator=g)
    return e, (torch.randn(pooled_width, generator=g) if pooled_width else None)


class KeyedEncoder:
    """A host encoder with a ``cache_key``; ``salt`` makes a different "CLIP" (other embeddings per text)."""

    def __init__(self, key="clip-a", width=64, pooled_width=None, salt=0):
        self.cache_key, self.width, self.pooled_width, self.salt = key, width, pooled_width, salt
        self.texts: list[str] = []

    def __call__(self, texts):
        self.texts += texts
        out = [_embedding(t, self.width, self.pooled_width, self.salt) for t in texts]
        pooled = torch.stack([p for _, p in out]) if self.pooled_width else None
        return torch.stack([e for e, _ in out]), pooled


SRC = [f"a photo of a cat, take {i}" for i in range(7)]
TGT = [f"a photo of a dog, take {i}" for i in range(5)]
HORSE = [f"a photo of a horse, take {i}" for i in range(3)]


def _delta64(src, tgt, width=64, salt=0):
    mean = lambda texts: sum(_embedding(t, width, None, salt)[0].double() for t in texts) / len(texts)  # noqa: E731
    return mean(tgt) - mean(src)


def test_progress_counts_sentences_from_zero_to_total():
    calls = []
    D.sentence_bank_direction(KeyedEncoder(), SRC, TGT, batch_size=3, progress=lambda d, t: calls.append((d, t)))
    # 7 source sentences in batches of 3 (3, 3, 1), then 5 target sentences (3, 2)
    assert calls == [(0, 12), (3, 12), (6, 12), (7, 12), (10, 12), (12, 12)]


def test_progress_can_cancel_between_batches():
    enc = KeyedEncoder()

    def cancel_after_first_batch(done, total):
        if done >= 2:
            raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        D.sentence_bank_direction(enc, SRC, TGT, batch_size=2, progress=cancel_after_first_batch)
    assert enc.texts == SRC[:2]


def test_second_direction_with_the_same_encoder_encodes_nothing():
    cache = D.EmbeddingCache()
    first = KeyedEncoder()
    d1 = D.sentence_bank_direction(first, SRC, TGT, batch_size=4, cache=cache)
    again = KeyedEncoder()  # same key: same CLIP
    calls = []
    d2 = D.sentence_bank_direction(again, SRC, TGT, batch_size=4, cache=cache, progress=lambda d, t: calls.append(t))
    assert again.texts == [] and calls == [0]
    torch.testing.assert_close(d1.delta.double(), _delta64(SRC, TGT), rtol=0, atol=1e-6)
    torch.testing.assert_close(d2.delta, d1.delta, rtol=0, atol=0)
    assert d2.encoders == d1.encoders and (d2.num_source, d2.num_target) == (7, 5)


def test_a_shared_side_is_reused_and_only_the_new_side_encoded():
    cache = D.EmbeddingCache()
    D.sentence_bank_direction(KeyedEncoder(), SRC, TGT, cache=cache)
    enc, totals = KeyedEncoder(), []
    d = D.sentence_bank_direction(enc, SRC, HORSE, cache=cache, progress=lambda done, t: totals.append(t))
    assert enc.texts == HORSE and set(totals) == {len(HORSE)}
    torch.testing.assert_close(d.delta.double(), _delta64(SRC, HORSE), rtol=0, atol=1e-6)


def test_another_encoder_or_sentence_list_misses_the_cache():
    cache = D.EmbeddingCache()
    D.sentence_bank_direction(KeyedEncoder(), SRC, TGT, cache=cache)
    other = KeyedEncoder(key="clip-b", salt=1)
    d = D.sentence_bank_direction(other, SRC, TGT, cache=cache)
    assert other.texts == SRC + TGT
    torch.testing.assert_close(d.delta.double(), _delta64(SRC, TGT, salt=1), rtol=0, atol=1e-6)
    changed = KeyedEncoder()
    D.sentence_bank_direction(changed, SRC[:-1], TGT + ["one more dog"], cache=cache)
    assert changed.texts == SRC[:-1] + TGT + ["one more dog"]


def test_no_cache_key_means_no_caching():
    cache = D.EmbeddingCache()
    enc = KeyedEncoder(key=None)
    D.sentence_bank_direction(enc, SRC, TGT, cache=cache)
    D.sentence_bank_direction(enc, SRC, TGT, cache=cache)
    assert enc.texts == (SRC + TGT) * 2 and len(cache) == 0


def test_the_cache_is_bounded_least_recently_used_first():
    cache = D.EmbeddingCache(max_entries=2)
    D.sentence_bank_direction(KeyedEncoder(), SRC, TGT, cache=cache)  # entries: SRC, TGT
    D.sentence_bank_direction(KeyedEncoder(), SRC, HORSE, cache=cache)  # SRC used again, HORSE in, TGT out
    assert len(cache) == 2
    enc = KeyedEncoder()
    D.sentence_bank_direction(enc, SRC, TGT, cache=cache)
    assert enc.texts == TGT
    with pytest.raises(ValueError, match="max_entries must be >= 1, got 0"):
        D.EmbeddingCache(max_entries=0)


def test_cached_pooled_delta_and_encoder_split_survive_a_hit():
    cache = D.EmbeddingCache()
    first = KeyedEncoder(width=2048, pooled_width=32)
    first.encoders = (("l", 768), ("g", 1280))
    d1 = D.sentence_bank_direction(first, SRC, TGT, cache=cache)
    second = KeyedEncoder(width=2048, pooled_width=32)  # reports its split only once it has encoded
    d2 = D.sentence_bank_direction(second, SRC, TGT, cache=cache)
    assert second.texts == [] and d2.encoders == (("l", 768), ("g", 1280))
    torch.testing.assert_close(d2.pooled, d1.pooled, rtol=0, atol=0)
    mean = lambda texts: sum(_embedding(t, 2048, 32)[1].double() for t in texts) / len(texts)  # noqa: E731
    torch.testing.assert_close(d2.pooled.double(), mean(TGT) - mean(SRC), rtol=0, atol=1e-6)
