"""SD3 / Flux edit directions in the engine: the layout rule, sentence banks over T5-shaped host outputs, apply at
the right tokens, the mismatch errors, save / load with the layout and old files. Real widths (768, 1280, 4096)
on synthetic tensors; expectations are written out independently (float64 index arithmetic)."""

from __future__ import annotations

import json
import zlib

import pytest
import torch

from zerocon_core.text import direction as D
from zerocon_core.text import text_layout as L
from zerocon_core.text.direction import EditDirection

# ------------------------------------------------------------------------------------------------ real-shaped fakes


def _gen(text: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(text.encode()))


def sd3_row(text: str, l: bool = True, g: bool = True, t5: int = 77):  # noqa: E741
    """What ComfyUI's SD3 CLIP gives for one short prompt: ([77 CLIP | t5 T5] x 4096, pooled 2048)."""
    gen = _gen(text)
    clip = torch.zeros(77 if (l or g) else 0, 4096, dtype=torch.float64)
    pooled = torch.zeros(2048, dtype=torch.float64)
    if l:
        clip[:, :768] = torch.randn(77, 768, generator=gen, dtype=torch.float64)
        pooled[:768] = torch.randn(768, generator=gen, dtype=torch.float64)
    if g:
        clip[:, 768:2048] = torch.randn(77, 1280, generator=gen, dtype=torch.float64)
        pooled[768:] = torch.randn(1280, generator=gen, dtype=torch.float64)
    t5_part = torch.randn(t5, 4096, generator=gen, dtype=torch.float64)
    return torch.cat([clip, t5_part]), pooled


def flux_row(text: str, t5: int = 256):
    gen = _gen(text)
    return torch.randn(t5, 4096, generator=gen, dtype=torch.float64), torch.randn(
        768, generator=gen, dtype=torch.float64
    )


class Host:
    """An encode callable shaped like ComfyClipEncoder for SD3 / Flux."""

    def __init__(self, layout, encoders, row):
        self.layout, self.encoders, self.row = layout, encoders, row

    def __call__(self, texts):
        rows = [self.row(t) for t in texts]
        return torch.stack([r[0] for r in rows]).float(), torch.stack([r[1] for r in rows]).float()


SD3_FULL = (("l", 768), ("g", 1280), ("t5xxl", 4096))
SRC = ["a photo of a cat", "a cat on the grass", "a small cat"]
TGT = ["a photo of a dog", "a dog on the grass", "a small dog", "a dog"]


def _mean(rows):
    return sum(r[0] for r in rows) / len(rows), sum(r[1] for r in rows) / len(rows)


# ------------------------------------------------------------------------------------------------ layout rule


@pytest.mark.parametrize(
    "width, pooled, keys, clip_tokens, expect",
    [
        (768, None, ("l",), None, "SD1.x"),
        (64, None, ("l",), None, "SD1.x"),  # keys decide
        (1024, 1024, None, None, "SD2.x"),
        (2048, 1280, None, None, "SDXL"),
        (64, 32, ("g", "l"), None, "SDXL"),
        (4096, 2048, ("g", "l", "t5xxl"), None, "SD3"),
        (4096, 768, ("l", "t5xxl"), None, "Flux"),
        (4096, 2048, None, 0, "SD3"),  # T5-only SD3: pooled zeros, 2048 wide
        (4096, 768, None, 0, "Flux"),
        (4096, 64, None, 77, "SD3"),  # a CLIP part decides
        (4096, None, None, 0, ""),  # SD3 or Flux
        (333, None, None, None, ""),
    ],
)
def test_identify_layout(width, pooled, keys, clip_tokens, expect):
    assert L.identify_layout(width, pooled, keys=keys, clip_tokens=clip_tokens) == expect


def test_conditioning_layout_finds_sd3_parts_and_encoders():
    long = torch.cat([sd3_row("x")[0][:77], sd3_row("y")[0][:77], torch.randn(130, 4096, dtype=torch.float64)])
    lay = L.conditioning_layout(long.unsqueeze(0), torch.zeros(1, 2048))
    assert (lay.layout, lay.clip_tokens, lay.t5_tokens, lay.encoders) == ("SD3", 154, 130, ("l", "g", "t5xxl"))
    assert lay.describe() == "SD3: CLIP-L + CLIP-G + T5-XXL"
    only_l, pooled = sd3_row("x", g=False, t5=0)
    lay = L.conditioning_layout(only_l, pooled.unsqueeze(0))
    assert (lay.layout, lay.clip_tokens, lay.t5_tokens, lay.encoders) == ("SD3", 77, 0, ("l",))
    only_g, pooled = sd3_row("x", l=False)
    assert L.conditioning_layout(only_g, pooled.unsqueeze(0)).encoders == ("g", "t5xxl")
    t5_only, pooled = sd3_row("x", l=False, g=False)
    lay = L.conditioning_layout(t5_only.unsqueeze(0), pooled.unsqueeze(0))
    assert (lay.layout, lay.clip_tokens, lay.encoders) == ("SD3", 0, ("t5xxl",))
    flux, pooled = flux_row("x")
    lay = L.conditioning_layout(flux.unsqueeze(0), pooled.unsqueeze(0))
    assert (lay.layout, lay.clip_tokens, lay.t5_tokens, lay.describe()) == ("Flux", 0, 256, "Flux")
    assert L.conditioning_layout(flux).describe() == "SD3 or Flux"


# ------------------------------------------------------------------------------------------------ building


@pytest.mark.parametrize("present", [(True, True, True), (True, False, False), (False, True, True)])
def test_sd3_sentence_bank_is_mean_difference_per_encoder(present):
    l, g, t5 = present  # noqa: E741
    enc = tuple(e for e, on in zip(SD3_FULL, present) if on)
    host = Host("SD3", enc, lambda t: sd3_row(t, l, g, 77 if t5 else 0))
    d = D.sentence_bank_direction(host, SRC, TGT, "cat", "dog", batch_size=2)
    (ms, ps), (mt, pt) = (
        _mean([sd3_row(t, l, g, 77 if t5 else 0) for t in SRC]),
        _mean([sd3_row(t, l, g, 77 if t5 else 0) for t in TGT]),
    )
    diff, pdiff = mt - ms, pt - ps
    assert d.layout == "SD3" and d.encoders == enc and d.width == 4096
    if l:
        torch.testing.assert_close(d.deltas["l"].double(), diff[:77, :768], atol=1e-5, rtol=1e-5)
    if g:
        torch.testing.assert_close(d.deltas["g"].double(), diff[:77, 768:2048], atol=1e-5, rtol=1e-5)
    if t5:
        assert d.t5_length == 77
        torch.testing.assert_close(d.deltas["t5xxl"].double(), diff[77:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d.delta.double(), diff, atol=1e-5, rtol=1e-5)  # zero padding included
    torch.testing.assert_close(d.pooled.double(), pdiff, atol=1e-5, rtol=1e-5)


def test_flux_sentence_bank_and_prompt_difference():
    host = Host("Flux", (("t5xxl", 4096),), flux_row)
    d = D.sentence_bank_direction(host, SRC, TGT, "cat", "dog")
    (ms, ps), (mt, pt) = _mean([flux_row(t) for t in SRC]), _mean([flux_row(t) for t in TGT])
    assert d.layout == "Flux" and list(d.deltas) == ["t5xxl"] and d.t5_length == 256 and d.length == 256
    torch.testing.assert_close(d.deltas["t5xxl"].double(), mt - ms, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d.pooled.double(), pt - ps, atol=1e-5, rtol=1e-5)
    p = D.prompt_difference_direction(host, "a cat", "a dog")
    assert p.mode == "prompt" and p.layout == "Flux"
    torch.testing.assert_close(p.delta.double(), flux_row("a dog")[0] - flux_row("a cat")[0], atol=1e-5, rtol=1e-5)


def test_segmented_host_with_wrong_token_count_is_an_error():
    host = Host("SD3", SD3_FULL, lambda t: sd3_row(t, t5=0))  # says T5 is there, gives no T5 tokens
    with pytest.raises(ValueError, match="does not fit SD3 with CLIP-L \\+ CLIP-G \\+ T5-XXL"):
        D.sentence_bank_direction(host, SRC, TGT)


# ------------------------------------------------------------------------------------------------ applying


def _sd3_direction(seed=0, l=True, g=True, t5=77):  # noqa: E741
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    if l:
        deltas["l"] = torch.randn(77, 768, generator=gen)
    if g:
        deltas["g"] = torch.randn(77, 1280, generator=gen)
    if t5:
        deltas["t5xxl"] = torch.randn(t5, 4096, generator=gen)
    return EditDirection(deltas=deltas, pooled=torch.randn(2048, generator=gen), layout="SD3")


def _flux_direction(seed=0, t5=256):
    gen = torch.Generator().manual_seed(seed)
    return EditDirection(
        deltas={"t5xxl": torch.randn(t5, 4096, generator=gen)}, pooled=torch.randn(768, generator=gen), layout="Flux"
    )


def test_apply_sd3_adds_clip_delta_per_chunk_and_t5_delta_on_first_tokens():
    d = _sd3_direction()
    chunks = [sd3_row(f"c{i}")[0][:77] for i in range(2)]
    cond = torch.cat(chunks + [torch.randn(130, 4096, dtype=torch.float64)]).unsqueeze(0)  # 154 CLIP + 130 T5
    pooled = torch.randn(1, 2048, dtype=torch.float64)
    out, new_pooled = D.apply_direction(cond, d, 0.7, pooled)
    expect = cond.clone()
    for c in range(2):
        rows = slice(77 * c, 77 * c + 77)
        expect[0, rows, :768] += 0.7 * d.deltas["l"].double()
        expect[0, rows, 768:2048] += 0.7 * d.deltas["g"].double()
    expect[0, 154 : 154 + 77] += 0.7 * d.deltas["t5xxl"].double()  # the T5 tail (53 tokens) is left alone
    torch.testing.assert_close(out, expect)
    torch.testing.assert_close(new_pooled, pooled + 0.7 * d.pooled.double())
    assert torch.equal(out[0, 231:], cond[0, 231:]) and torch.equal(out[0, :154, 2048:], cond[0, :154, 2048:])


def test_apply_flux_shorter_and_longer_t5():
    d = _flux_direction()
    short = torch.randn(2, 100, 4096, dtype=torch.float64)
    pooled = torch.randn(2, 768, dtype=torch.float64)
    out, _ = D.apply_direction(short, d, -1.5, pooled)
    torch.testing.assert_close(out, short - 1.5 * d.deltas["t5xxl"][:100].double())
    long = torch.randn(1, 300, 4096, dtype=torch.float64)
    out = D.apply_direction(long, d, 2.0)
    torch.testing.assert_close(out[0, :256], long[0, :256] + 2.0 * d.deltas["t5xxl"].double())
    assert torch.equal(out[0, 256:], long[0, 256:])


def _message(direction, cond, pooled=None):
    with pytest.raises(ValueError) as err:
        D.apply_direction(cond, direction, 1.0, pooled)
    return " ".join(str(err.value).split())


def test_mismatch_errors_name_both_layouts():
    sd1 = EditDirection(deltas={"l": torch.zeros(77, 768)})
    sd1.extra["clip"] = "SD1ClipModel"
    flux, flux_pooled = flux_row("x")
    msg = _message(sd1, flux.unsqueeze(0), flux_pooled.unsqueeze(0))
    assert "the direction was made with a different CLIP (SD1ClipModel): it is 768 wide (SD1.x), but this " in msg
    assert "conditioning is 4096 wide (Flux)" in msg
    sd3, sd3_pooled = sd3_row("x")
    msg = _message(_flux_direction(), sd3.unsqueeze(0), sd3_pooled.unsqueeze(0))
    assert "it is 4096 wide (Flux), but this conditioning is 4096 wide (SD3: CLIP-L + CLIP-G + T5-XXL)" in msg
    msg = _message(_sd3_direction(g=False, t5=0), sd3.unsqueeze(0), sd3_pooled.unsqueeze(0))
    assert "it is 4096 wide (SD3: CLIP-L), but this conditioning is 4096 wide (SD3: CLIP-L + CLIP-G + T5-XXL)" in msg
    msg = _message(_sd3_direction(), flux.unsqueeze(0), flux_pooled.unsqueeze(0))
    assert "(SD3: CLIP-L + CLIP-G + T5-XXL), but this conditioning is 4096 wide (Flux)" in msg
    # Same token structure, other encoders: an SD3 CLIP-L + CLIP-G + T5 direction on a CLIP-L + T5 conditioning ...
    no_g, no_g_pooled = sd3_row("x", g=False)
    msg = _message(_sd3_direction(), no_g.unsqueeze(0), no_g_pooled.unsqueeze(0))
    assert "(SD3: CLIP-L + CLIP-G + T5-XXL), but this conditioning is 4096 wide (SD3: CLIP-L + T5-XXL)" in msg
    # ... and a Flux direction on a T5-only SD3 conditioning (told apart by SD3's 2048-wide pooled output).
    t5_only, t5_pooled = sd3_row("x", l=False, g=False, t5=256)
    msg = _message(_flux_direction(), t5_only.unsqueeze(0), t5_pooled.unsqueeze(0))
    assert "it is 4096 wide (Flux), but this conditioning is 4096 wide (SD3: T5-XXL)" in msg
    # No pooled output: the conditioning cannot be told SD3 or Flux; a T5-only SD3 direction is not a Flux one.
    msg = _message(_sd3_direction(), flux.unsqueeze(0))
    assert "(SD3: CLIP-L + CLIP-G + T5-XXL), but this conditioning is 4096 wide (SD3 or Flux)" in msg
    torch.testing.assert_close(D.apply_direction(flux.unsqueeze(0), _flux_direction(), 0.0), flux.unsqueeze(0))


# ------------------------------------------------------------------------------------------------ save / load


@pytest.mark.parametrize("make", [_sd3_direction, _flux_direction, lambda: _sd3_direction(l=False, t5=0)])
def test_save_load_round_trip_keeps_layout(tmp_path, make):
    from safetensors import safe_open

    d = make()
    d.extra["clip"] = "SomeClip"
    D.save_direction(tmp_path / "d.safetensors", d)
    with safe_open(str(tmp_path / "d.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["layout"] == d.layout and meta["format_version"] == "2"
    back = D.load_direction(tmp_path / "d.safetensors")
    assert back.layout == d.layout and back.encoders == d.encoders and back.kind() == d.kind()
    torch.testing.assert_close(back.delta, d.delta)
    torch.testing.assert_close(back.pooled, d.pooled)


def test_old_files_without_layout_still_load(tmp_path):
    from safetensors.torch import save_file

    xl = {"delta.l": torch.randn(77, 768), "delta.g": torch.randn(77, 1280), "pooled": torch.randn(1280)}
    meta = {"format": D.FORMAT, "format_version": "1", "encoders": json.dumps([["l", 768], ["g", 1280]])}
    save_file(xl, str(tmp_path / "old.safetensors"), metadata=meta)
    old = D.load_direction(tmp_path / "old.safetensors")
    assert old.layout == "SDXL" and old.width == 2048
    torch.testing.assert_close(old.delta, torch.cat([xl["delta.l"], xl["delta.g"]], -1))
    save_file(
        {"delta.l": torch.randn(77, 768)},
        str(tmp_path / "sd1.safetensors"),
        metadata={**meta, "encoders": '[["l", 768]]'},
    )
    assert D.load_direction(tmp_path / "sd1.safetensors").layout == "SD1.x"
    # An SD1.x direction is still written as version 1 (older versions of the pack read it).
    D.save_direction(tmp_path / "new.safetensors", old)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "new.safetensors"), framework="pt") as f:
        assert f.metadata()["format_version"] == "1" and f.metadata()["layout"] == "SDXL"


def test_unknown_layout_field_is_inferred_with_a_warning(tmp_path, caplog):
    from safetensors.torch import save_file

    meta = {"format": D.FORMAT, "format_version": "2", "layout": "SD9", "encoders": '[["h", 1024]]'}
    save_file({"delta.h": torch.randn(77, 1024)}, str(tmp_path / "odd.safetensors"), metadata=meta)
    with caplog.at_level("WARNING", logger="zerocon"):
        d = D.load_direction(tmp_path / "odd.safetensors")
    assert d.layout == "SD2.x" and "unknown edit direction layout 'SD9'" in caplog.text


def test_a_direction_built_without_a_layout_is_named_by_its_deltas():
    """Deltas of CLIP-L + T5 (SD3 without CLIP-G) are SD3's, not Flux's: Flux directions carry a T5 delta alone."""
    sd3 = EditDirection({"l": torch.randn(77, 768), L.T5_KEY: torch.randn(77, L.T5_WIDTH)}, torch.randn(2048))
    flux = EditDirection({L.T5_KEY: torch.randn(256, L.T5_WIDTH)}, torch.randn(768))
    xl = EditDirection({"l": torch.randn(77, 768), "g": torch.randn(77, 1280)}, torch.randn(1280))
    assert (sd3.layout, flux.layout, xl.layout) == ("SD3", "Flux", "SDXL")
