"""Every message README.md quotes in bold double quotes (**"..."**) is the code's own text: each one is raised
(or logged) here by the code path that produces it, and the README's quote, with "..." standing for the parts
that vary, must match the real message. A quote added to the README without a trigger below fails the test."""

from __future__ import annotations

import dataclasses
import logging
import re

import pytest
import sampling_helpers as h
import tiny_models as tm
import torch
from conftest import REPO, pack_module
from test_text_nodes import model_dirs  # noqa: F401  (fixture: temporary, empty models/blip)

QUOTE = re.compile(r'\*\*"(.+?)"\*\*', re.S)


def readme_quotes() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    quotes = [" ".join(q.split()) for q in QUOTE.findall(text)]
    return [q for q in quotes if q != "..."]  # the marker's own example in the README's comment


def quote_pattern(quote: str) -> re.Pattern:
    """The quote as a pattern: literal text, "..." = anything (at least one character)."""
    return re.compile(".+?".join(re.escape(part) for part in quote.split("...")))


def _message(fn) -> str:
    with pytest.raises(Exception) as err, torch.inference_mode():
        fn()
    return str(err.value)


# -- triggers: README quote -> the real message --------------------------------------------------------------


def blip_missing(ctx):
    blip = pack_module("nodes.classes.blip_nodes")
    return _message(
        lambda: blip.ZeroConBLIPLoader.execute(
            model="blip-image-captioning-base", precision="fp32", device="cpu", allow_download=True
        )
    )


def unsupported_model(ctx):
    return _message(lambda: ctx.zc.families.detect_family(tm.flux_fill()))


def direction_width(ctx):
    dn = pack_module("nodes.classes.direction_nodes")
    zdir = pack_module("zerocon_core.text.direction")
    sd1 = zdir.EditDirection(deltas={"l": torch.zeros(77, 768)}, source="cat", target="dog")
    sd1.extra["clip"] = "SD1ClipModel"
    sdxl_cond = [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]]
    return _message(lambda: dn.ZeroConApplyEditDirection.execute(conditioning=sdxl_cond, direction=sd1, strength=1.0))


def direction_layout(ctx):
    dn = pack_module("nodes.classes.direction_nodes")
    zdir = pack_module("zerocon_core.text.direction")
    flux = zdir.EditDirection(deltas={"t5xxl": torch.zeros(256, 4096)}, pooled=torch.zeros(768), layout="Flux")
    sd3 = torch.zeros(1, 77 + 77, 4096)
    sd3[:, :77, :2048] = 1.0  # CLIP-L and CLIP-G channels of the CLIP part; zeros from 2048 on
    sd3[:, 77:] = 1.0  # T5 tokens
    sd3_cond = [[sd3, {"pooled_output": torch.ones(1, 2048)}]]
    return _message(lambda: dn.ZeroConApplyEditDirection.execute(conditioning=sd3_cond, direction=flux, strength=1.0))


def inversion_size(ctx):
    _, inversion, _ = h.invert(ctx.zc, ctx.run, ctx.model, tm.latent(40), tm.conditioning(41))
    return _message(
        lambda: h.guided(ctx.zc, ctx.run, ctx.model, inversion, tm.conditioning(42), latent=tm.latent(43, size=24))
    )


def batch_mismatch(ctx):
    return _message(lambda: h.invert(ctx.zc, ctx.run, ctx.model, tm.latent(44, batch=2), tm.conditioning(45, batch=3)))


def gradient_not_finite(ctx):
    """A term whose gradient overflows (the state needs half precision in real use; forced here)."""
    base = pack_module("zerocon_core.method.guidance").GuidanceTerm

    @dataclasses.dataclass(frozen=True)
    class Overflow(base):
        def loss(self, step_ctx, request):
            return (step_ctx.x * float("inf")).sum()

    _, inversion, _ = h.invert(ctx.zc, ctx.run, ctx.model, tm.latent(46), tm.conditioning(47))
    with ctx.caplog.at_level(logging.WARNING, logger="zerocon"):
        h.guided(ctx.zc, ctx.run, ctx.model, inversion, tm.conditioning(48), guidance=(Overflow(weight=1.0),))
    return "\n".join(r.getMessage() for r in ctx.caplog.records)


TRIGGERS = {
    "ZeroCon BLIP Loader: no BLIP captioning model in ...": blip_missing,
    "ZeroCon supports SD1.x, SD2.x (eps or v-prediction), SDXL, SD3/SD3.5, Flux, Flux.2, Chroma, Qwen-Image and Z-Image models only; this MODEL is ...": (
        unsupported_model
    ),
    "the direction was made with a different CLIP (...): it is 768 wide (SD1.x), but this conditioning is 2048 wide "
    "(SDXL)": direction_width,
    "it is 4096 wide (Flux), but this conditioning is 4096 wide (SD3: CLIP-L + CLIP-G + T5-XXL)": direction_layout,
    "the inversion latent size ... differs from the LATENT": inversion_size,
    "batch mismatch": batch_mismatch,
    "step ...: guidance gradient is not finite; step skipped": gradient_not_finite,
}


def test_every_quoted_message_has_a_trigger():
    quotes = readme_quotes()
    assert quotes, "no quoted messages found: the README's marker changed?"
    assert sorted(set(quotes)) == sorted(TRIGGERS)


@pytest.mark.parametrize("quote", sorted(TRIGGERS))
def test_readme_quote_is_the_codes_text(quote, zc, run, sd15_model, model_dirs, caplog):  # noqa: F811
    ctx = type("Ctx", (), dict(zc=zc, run=run, model=sd15_model, caplog=caplog))
    message = " ".join(TRIGGERS[quote](ctx).split())
    assert quote_pattern(quote).search(message), f"README quotes {quote!r}; the code says {message!r}"


def test_the_pattern_rejects_a_drifted_quote():
    pattern = quote_pattern("direction was made with a 768-wide text encoder (SD1.x) but the conditioning is ...")
    real = "the direction was made with a different CLIP (SD1ClipModel): it is 768 wide (SD1.x), but this conditioning"
    assert not pattern.search(real)
    assert quote_pattern("it is ... wide").search(real)
