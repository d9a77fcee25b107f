"""pix2pix-zero's noise regulariser (zerocon_core.method.inversion.NoiseRegularization) against its update written out.

The auto-correlation loss is re-implemented here (float64, shifts fixed per pyramid level) and its gradient
taken by autograd; the KL step's gradient is the closed form. These tests fail on a regulariser that drops its
KL step, forgets to divide the auto-correlation step by the number of rolls, or does its steps in another
order; the behaviour tests in test_inversion.py ("it lowers both losses") let those through.
"""

from __future__ import annotations

import pytest
import torch

from zerocon_core.method.inversion import NoiseRegularization


def shift_for(side: int) -> int:
    """The shift the patched ``torch.randint`` returns at a level of this side: the largest allowed."""
    return max(side // 2, 2) - 1


@pytest.fixture()
def fixed_shifts(monkeypatch):
    """``torch.randint(low, high, ...)`` -> ``high - 1``: the shift depends on the pyramid level only."""

    def randint(low, high, size, generator=None, **kw):
        return torch.full(size, int(high) - 1, dtype=torch.long)

    monkeypatch.setattr(torch, "randint", randint)


def ref_auto_corr(eps: torch.Tensor, min_size: int = 8) -> torch.Tensor:
    """Sum over images, channels and the 2x2-pooled pyramid (down to ``min_size``) of the squared mean
    circular auto-correlation at the level's shift, along H and along W."""
    total = eps.new_zeros(())
    for b in range(eps.shape[0]):
        for c in range(eps.shape[1]):
            n = eps[b, c]
            while True:
                side = min(n.shape)
                d = shift_for(side)
                total = total + (n * torch.roll(n, d, 0)).mean() ** 2 + (n * torch.roll(n, d, 1)).mean() ** 2
                if side <= min_size:
                    break
                h, w = n.shape
                n = n.reshape(h // 2, 2, w // 2, 2).mean(dim=(1, 3))
    return total


def ref_kl_grad(eps: torch.Tensor) -> torch.Tensor:
    """d/dx of ``var + mu^2 - 1 - log(var + 1e-7)`` per image (unbiased variance), in closed form."""
    x = eps.flatten(1)
    n = x.shape[1]
    mu = x.mean(1, keepdim=True)
    var = x.var(1, keepdim=True)
    g = (1 - 1 / (var + 1e-7)) * 2 * (x - mu) / (n - 1) + 2 * mu / n
    return g.reshape(eps.shape)


def ref_regularize(eps, lambda_ac, lambda_kl, outer, rolls):
    """``outer`` rounds of (``rolls`` gradient steps of size ``lambda_ac / rolls`` on the auto-correlation
    loss, then one step of size ``lambda_kl`` on the KL loss)."""
    eps = eps.clone()
    for _ in range(outer):
        for _ in range(rolls):
            v = eps.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(ref_auto_corr(v), v)
            eps = eps - lambda_ac / rolls * g
        eps = eps - lambda_kl * ref_kl_grad(eps)
    return eps


def noisy(seed: int = 0) -> torch.Tensor:
    """Correlated, off-scale float64 "noise" (1, 2, 16, 16): both losses are far from their minimum."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, 18, 18, generator=g, dtype=torch.float64)
    return torch.nn.functional.avg_pool2d(x, 3, 1) * 2 + 0.3


@pytest.mark.parametrize(
    "lambda_ac,lambda_kl,outer,rolls", [(20.0, 20.0, 2, 3), (5.0, 0.0, 1, 4), (0.0, 3.0, 2, 1), (20.0, 20.0, 1, 1)]
)
def test_regulariser_equals_its_written_out_update(fixed_shifts, lambda_ac, lambda_kl, outer, rolls):
    eps = noisy()
    reg = NoiseRegularization(lambda_ac=lambda_ac, lambda_kl=lambda_kl, outer=outer, rolls=rolls)
    got = reg(eps, torch.Generator().manual_seed(0))
    want = ref_regularize(eps, lambda_ac, lambda_kl, outer, rolls)
    assert not torch.allclose(want, eps)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_more_rolls_split_the_same_step(fixed_shifts):
    """The auto-correlation step size is ``lambda_ac / rolls``: at a small step, N rolls of 1/N move the noise
    about as far as one roll (first order), not N times as far."""
    eps = noisy(1)
    one = NoiseRegularization(lambda_ac=0.5, lambda_kl=0.0, outer=1, rolls=1)(eps, None)
    five = NoiseRegularization(lambda_ac=0.5, lambda_kl=0.0, outer=1, rolls=5)(eps, None)
    d1, d5 = float((one - eps).norm()), float((five - eps).norm())
    assert d1 > 0 and d5 == pytest.approx(d1, rel=0.05)
