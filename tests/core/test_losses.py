"""zerocon_core.method.losses against independent float64 (numpy) formulas written here, plus gradchecks.

References: pix2pix-zero ``edit_pipeline.py`` (cross-attention loss), ``ddim_inv.py`` (auto-correlation,
KL); CUT ``models/patchnce.py`` (PatchNCE). See docs/method.md §3, §5, §6.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from zerocon_core.method import losses as L

TAU = 0.07


def rng(seed=0):
    return np.random.default_rng(seed)


def t64(a):
    return torch.from_numpy(np.ascontiguousarray(a)).to(torch.float64)


# ---------------------------------------------------------------------------------------------------------
# independent references (numpy, float64)


def ref_cross_attention(edit: dict, ref: dict) -> float:
    total = 0.0
    for name in edit:
        e, r = edit[name], ref[name]  # (B, heads, HW, T)
        b, h = e.shape[:2]
        per = [((e[i, j] - r[i, j]) ** 2).sum() for i in range(b) for j in range(h)]
        total += sum(per) / len(per)
    return total


def _unit(v):
    return v / max(np.linalg.norm(v), 1e-12)


def ref_patch_nce(q, k, idx, tau=TAU) -> float:
    """CUT PatchNCE: q, k (B, C, H, W); idx sampled flat locations; diag of the negative block = -10."""
    b = q.shape[0]
    losses = []
    for n in range(b):
        qf = q[n].reshape(q.shape[1], -1)[:, idx].T  # (S, C)
        kf = k[n].reshape(k.shape[1], -1)[:, idx].T
        qn = np.stack([_unit(v) for v in qf])
        kn = np.stack([_unit(v) for v in kf])
        s = len(idx)
        for i in range(s):
            pos = float(qn[i] @ kn[i])
            negs = [(-10.0 if j == i else float(qn[i] @ kn[j])) for j in range(s)]
            logits = np.array([pos] + negs) / tau
            m = logits.max()
            lse = m + math.log(np.exp(logits - m).sum())
            losses.append(lse - logits[0])
    return float(np.mean(losses))


def avg_pool(x, p):
    b, c, h, w = x.shape
    h2, w2 = h // p, w // p
    return x[:, :, : h2 * p, : w2 * p].reshape(b, c, h2, p, w2, p).mean(axis=(3, 5))


def ref_auto_corr(eps, shift_for_side, min_size=8) -> float:
    """pix2pix-zero auto-correlation loss with a given shift per pyramid level (function of the side)."""
    total = 0.0
    b, c = eps.shape[:2]
    for n in range(b):
        for ch in range(c):
            noise = eps[n, ch]
            while True:
                side = min(noise.shape)
                d = shift_for_side(side)
                total += np.mean(noise * np.roll(noise, d, axis=0)) ** 2
                total += np.mean(noise * np.roll(noise, d, axis=1)) ** 2
                if side <= min_size:
                    break
                noise = noise.reshape(noise.shape[0] // 2, 2, noise.shape[1] // 2, 2).mean(axis=(1, 3))
    return total


def ref_kl(eps) -> float:
    total = 0.0
    for x in eps.reshape(eps.shape[0], -1):
        var = x.var(ddof=1)
        total += var + x.mean() ** 2 - 1 - math.log(var + 1e-7)
    return total


# ---------------------------------------------------------------------------------------------------------
# cross-attention


def _softmax(a, axis=-1):
    e = np.exp(a - a.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _maps(seed, shapes):
    r = rng(seed)
    return {name: _softmax(r.normal(size=s)) for name, s in shapes.items()}


SHAPES = {"down.0": (2, 2, 16, 7), "mid": (2, 2, 4, 7), "up.1": (2, 2, 16, 7)}


def test_cross_attention_loss_matches_reference():
    e, r = _maps(0, SHAPES), _maps(1, SHAPES)
    got = L.cross_attention_loss({k: t64(v) for k, v in e.items()}, {k: t64(v) for k, v in r.items()})
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(ref_cross_attention(e, r), rel=1e-12)


def test_cross_attention_loss_float32_and_identical_zero():
    e = _maps(0, SHAPES)
    got = L.cross_attention_loss(
        {k: t64(v).half() for k, v in e.items()}, {k: t64(v).float() for k, v in _maps(1, SHAPES).items()}
    )
    assert got.dtype == torch.float32
    assert L.cross_attention_loss({k: t64(v) for k, v in e.items()}, {k: t64(v) for k, v in e.items()}).item() == 0.0


def test_cross_attention_loss_reference_detached_and_gradcheck():
    shapes = {"a": (1, 2, 3, 4), "b": (1, 1, 2, 4)}
    e = {k: t64(v).requires_grad_(True) for k, v in _maps(2, shapes).items()}
    r = {k: t64(v).requires_grad_(True) for k, v in _maps(3, shapes).items()}
    L.cross_attention_loss(e, r).backward()
    assert all(v.grad is None for v in r.values())
    names = list(shapes)
    ref = {k: v.detach() for k, v in r.items()}
    torch.autograd.gradcheck(
        lambda *xs: L.cross_attention_loss(dict(zip(names, xs)), ref),
        tuple(v.detach().requires_grad_() for v in e.values()),
    )


def test_cross_attention_loss_errors():
    a = {"x": torch.rand(1, 2, 4, 7)}
    with pytest.raises(ValueError, match="differ in shape"):
        L.cross_attention_loss(a, {"x": torch.rand(1, 2, 4, 8)})
    with pytest.raises(ValueError, match="layers differ"):
        L.cross_attention_loss(a, {"y": torch.rand(1, 2, 4, 7)})
    with pytest.raises(ValueError):
        L.cross_attention_loss({}, {})


# ---------------------------------------------------------------------------------------------------------
# PatchNCE


def test_patch_nce_matches_cut_formula():
    r = rng(4)
    q, k = r.normal(size=(2, 8, 5, 4)), r.normal(size=(2, 8, 5, 4))
    idx = np.array([3, 0, 17, 9, 11, 4, 19])
    got = L.patch_nce_loss(t64(q), t64(k), torch.from_numpy(idx), tau=TAU)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(ref_patch_nce(q, k, idx), rel=1e-10)
    # other tau
    got = L.patch_nce_loss(t64(q), t64(k), torch.from_numpy(idx), tau=0.2)
    assert got.item() == pytest.approx(ref_patch_nce(q, k, idx, tau=0.2), rel=1e-10)


def test_patch_nce_chance_and_identical():
    n = 256
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(1, 1280, 16, 16, generator=g)
    other = torch.randn(1, 1280, 16, 16, generator=g)
    idx = torch.arange(n)
    same = L.patch_nce_loss(feats, feats.clone(), idx).item()
    rand = L.patch_nce_loss(feats, other, idx).item()
    assert L.chance_patch_nce(n) == pytest.approx(math.log(n))
    assert same < 0.01 * math.log(n)
    # unrelated features: ln(N) + Var(logit)/2, with Var = 1 / (C tau^2) ~ 0.16 for C = 1280
    assert abs(rand - math.log(n)) < 0.3


def test_patch_nce_key_detached_and_gradcheck():
    r = rng(5)
    q = t64(r.normal(size=(1, 4, 3, 3))).requires_grad_()
    k = t64(r.normal(size=(1, 4, 3, 3))).requires_grad_()
    idx = torch.arange(9)
    L.patch_nce_loss(q, k, idx).backward()
    assert k.grad is None and q.grad is not None
    kd = k.detach()
    torch.autograd.gradcheck(lambda x: L.patch_nce_loss(x, kd, idx, tau=0.5), (q.detach().requires_grad_(),))


def test_patch_nce_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        L.patch_nce_loss(torch.rand(1, 4, 4, 4), torch.rand(1, 4, 4, 3), torch.arange(4))


def test_multi_patch_nce_matches_reference_all_locations():
    """num_patches >= locations: every location is used, so the loss does not depend on the sampling order."""
    r = rng(6)
    shapes = {"up.16": (1, 6, 4, 4), "up.8": (1, 5, 6, 6)}
    e = {k: r.normal(size=s) for k, s in shapes.items()}
    f = {k: r.normal(size=s) for k, s in shapes.items()}
    expected = 0.0
    for name in shapes:
        for p in (1, 2):
            q, k = (e[name], f[name]) if p == 1 else (avg_pool(e[name], 2), avg_pool(f[name], 2))
            expected += ref_patch_nce(q, k, np.arange(q.shape[2] * q.shape[3]))
    got = L.multi_patch_nce_loss(
        {k: t64(v) for k, v in e.items()},
        {k: t64(v) for k, v in f.items()},
        patch_sizes=(1, 2),
        num_patches=256,
    )
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_multi_patch_nce_sampled_indices_are_a_permutation_head():
    """With fewer patches than locations: per (layer, size), indices = head of randperm(HW) drawn from a generator
    seeded by the hash of (seed, step, layer, size) (blake2b, 8 bytes little-endian, top bit cleared)."""
    import hashlib

    def perm_head(key: str, n: int, s: int):
        h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") & (2**63 - 1)
        return torch.randperm(n, generator=torch.Generator().manual_seed(h))[:s].numpy()

    r = rng(7)
    e, f = r.normal(size=(1, 4, 8, 8)), r.normal(size=(1, 4, 8, 8))
    got = L.multi_patch_nce_loss({"a": t64(e)}, {"a": t64(f)}, patch_sizes=(1, 2), num_patches=10, seed=3, step=5)
    idx1, idx2 = perm_head("3/5/a/1", 64, 10), perm_head("3/5/a/2", 16, 10)
    expected = ref_patch_nce(e, f, idx1) + ref_patch_nce(avg_pool(e, 2), avg_pool(f, 2), idx2)
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_multi_patch_nce_on_recorded_samples_equals_the_reference_formula():
    """The inversion's record (``patch_samples``: the pooled map at the step's locations) gives the loss of the full
    reference map: CUT's formula at those locations, pooling first (odd sizes: the last row is dropped)."""
    r = rng(9)
    e, f = r.normal(size=(2, 4, 9, 6)), r.normal(size=(2, 4, 9, 6))
    samples = L.patch_samples(t64(f), "a", 3, (1, 2), 10, seed=4)
    assert sorted(samples.values) == [(1, 4, 10), (2, 4, 10)] and samples.shape == (2, 4, 9, 6)
    got = L.multi_patch_nce_loss({"a": t64(e)}, {"a": samples}, (1, 2), 10, seed=4, step=3)
    full = L.multi_patch_nce_loss({"a": t64(e)}, {"a": t64(f)}, (1, 2), 10, seed=4, step=3)
    idx1 = L.patch_locations(4, 3, "a", 1, 54, 10).numpy()
    idx2 = L.patch_locations(4, 3, "a", 2, 12, 10).numpy()
    expected = ref_patch_nce(e, f, idx1) + ref_patch_nce(avg_pool(e, 2), avg_pool(f, 2), idx2)
    assert got.item() == pytest.approx(expected, rel=1e-10) and full.item() == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError, match="recorded for other PatchNCE settings"):
        L.multi_patch_nce_loss({"a": t64(e)}, {"a": samples}, (1, 2), 10, seed=5, step=3)


def test_multi_patch_nce_gradcheck_and_errors():
    r = rng(8)
    q = t64(r.normal(size=(1, 3, 4, 4))).requires_grad_()
    k = t64(r.normal(size=(1, 3, 4, 4)))
    torch.autograd.gradcheck(
        lambda x: L.multi_patch_nce_loss({"a": x}, {"a": k}, num_patches=5, tau=0.5, seed=1),
        (q,),
    )
    with pytest.raises(ValueError, match="layers differ"):
        L.multi_patch_nce_loss({"a": q}, {"b": k})
    with pytest.raises(ValueError, match="differ in shape"):
        L.multi_patch_nce_loss({"a": q}, {"a": k[..., :3]})
    with pytest.raises(ValueError, match="patch sizes"):
        L.multi_patch_nce_loss({"a": q}, {"a": k}, patch_sizes=(0,))
    with pytest.raises(ValueError):
        L.multi_patch_nce_loss({}, {})
    with pytest.raises(ValueError, match="too small"):
        L.multi_patch_nce_loss({"a": q[..., :1, :1]}, {"a": k[..., :1, :1]}, patch_sizes=(1,))


# ---------------------------------------------------------------------------------------------------------
# auto-correlation and KL


class _FixedRandint:
    """Stand-in for torch.randint that records (low, high) and returns ``pick(low, high)``."""

    def __init__(self, pick):
        self.pick = pick
        self.calls = []

    def __call__(self, low, high, size, generator=None, **kw):
        self.calls.append((int(low), int(high)))
        return torch.full(size, self.pick(int(low), int(high)), dtype=torch.long)


@pytest.mark.parametrize("pick", ["smallest", "largest"])
def test_auto_corr_matches_reference_with_fixed_shifts(monkeypatch, pick):
    eps = rng(9).normal(size=(2, 3, 16, 16))
    choose = (lambda lo, hi: lo) if pick == "smallest" else (lambda lo, hi: hi - 1)
    fake = _FixedRandint(choose)
    monkeypatch.setattr(torch, "randint", fake)
    got = L.auto_corr_loss(t64(eps))
    assert got.dtype == torch.float64
    # the same shift for a pyramid level: side 16 -> [1, 8), side 8 -> [1, 4)
    expected = ref_auto_corr(eps, lambda side: choose(1, side // 2))
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_auto_corr_shift_ranges_never_zero(monkeypatch):
    """Shifts are drawn from [1, side/2) at every level of the 64 -> 32 -> 16 -> 8 pyramid (ec33392 fix)."""
    fake = _FixedRandint(lambda lo, hi: lo)
    monkeypatch.setattr(torch, "randint", fake)
    L.auto_corr_loss(torch.randn(1, 4, 64, 64))
    assert fake.calls == [(1, 32), (1, 16), (1, 8), (1, 4)] * 4


def test_auto_corr_generator_reproducible_and_gradcheck():
    eps = torch.randn(1, 2, 16, 16, dtype=torch.float64)
    a = L.auto_corr_loss(eps, generator=torch.Generator().manual_seed(5))
    b = L.auto_corr_loss(eps, generator=torch.Generator().manual_seed(5))
    assert a.item() == b.item()
    torch.autograd.gradcheck(
        lambda x: L.auto_corr_loss(x, generator=torch.Generator().manual_seed(5)), (eps.clone().requires_grad_(),)
    )


def test_kl_matches_reference_and_gradcheck():
    eps = rng(10).normal(loc=0.3, scale=1.7, size=(2, 4, 8, 8))
    got = L.kl_loss(t64(eps))
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(ref_kl(eps), rel=1e-12)
    torch.autograd.gradcheck(L.kl_loss, (t64(eps[:1, :2, :4, :4]).requires_grad_(),))
    # standard normal noise: KL near 0
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    assert abs(L.kl_loss(z).item()) < 0.01


@pytest.mark.parametrize("side", [8, 16, 64])
def test_auto_corr_random_shift_is_never_zero(side, monkeypatch):
    """A delta has zero circular auto-correlation at every shift except 0 (mod side), at every pyramid level
    (a 2x2-pooled delta is a delta): so the loss is exactly 0 unless some drawn shift is 0 - the
    pix2pix-zero bug fixed in ec33392. The drawn shifts themselves are recorded and checked too."""
    eps = torch.zeros(1, 4, side, side, dtype=torch.float64)
    eps[..., 0, 0] = 1.0
    assert float((eps * eps).mean() ** 2) > 0  # what a zero shift would add
    shifts: list[tuple[int, int]] = []
    real_roll = torch.roll

    def roll(t, shifts_, dims):
        shifts.append((int(shifts_), t.shape[dims]))
        return real_roll(t, shifts=shifts_, dims=dims)

    monkeypatch.setattr(L.torch, "roll", lambda t, shifts, dims: roll(t, shifts, dims))
    for seed in range(40):
        assert float(L.auto_corr_loss(eps, torch.Generator().manual_seed(seed))) == 0.0
    assert all(1 <= d < max(n // 2, 2) for d, n in shifts)
    if side == 64:
        assert {n for _, n in shifts} == {64, 32, 16, 8}
        assert len({d for d, n in shifts if n == 64}) > 10  # really random over [1, 32)
