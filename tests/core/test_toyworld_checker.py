"""The toy world and its checker: scenes are reproducible, the checker reads colour, shape, background and the
object mask back exactly from drawn scenes, the tokenizer keeps every word whole, and edit scoring gives the
ideal edit full marks and the unedited source none."""

from __future__ import annotations

import math

import numpy as np
import pytest

from zerocon_core.toyworld import checker, edits
from zerocon_core.toyworld.world import BACKGROUNDS, COLOURS, SHAPES, caption, render, scenes


def test_scenes_are_reproducible_and_cover_the_world():
    a, b = scenes(5, 200), scenes(5, 200)
    assert a == b
    assert all(np.array_equal(render(x)[0], render(y)[0]) for x, y in zip(a[:20], b[:20]))
    assert {s.colour for s in a} == set(COLOURS)
    assert {s.shape for s in a} == set(SHAPES)
    assert {s.background for s in a} == set(BACKGROUNDS)
    assert scenes(6, 5) != a[:5]


def test_caption_names_the_scene():
    s = scenes(1, 1)[0].replace(colour="red", shape="circle", background="stripes")
    assert s.caption == caption("red", "circle", "stripes") == "a red circle on a striped background"


@pytest.mark.parametrize("seed", [11, 12])
def test_checker_is_exact_on_drawn_scenes(seed):
    for scene in scenes(seed, 300):
        image, mask = render(scene)
        r = checker.read(image)
        assert (r.colour, r.shape, r.background) == (scene.colour, scene.shape, scene.background), scene
        assert np.array_equal(r.mask, mask), scene
        assert checker.read(image.transpose(2, 0, 1)).colour == scene.colour  # channels-first works too


def test_checker_reports_no_object_on_a_bare_background():
    image, mask = render(scenes(3, 1)[0])
    bare = np.repeat(image.mean(-1, keepdims=True), 3, -1) * ~mask[..., None] + 0.5 * mask[..., None]
    r = checker.read(bare)
    assert r.colour is None and r.shape is None and not r.mask.any()


def test_structure_scores():
    a = np.zeros((32, 32), bool)
    a[4:12, 4:12] = True
    b = np.zeros_like(a)
    b[8:12, 4:12] = True
    assert checker.iou(a, a) == 1.0 and checker.iou(a, b) == 0.5
    img = np.full((32, 32, 3), 0.5)
    noisy = img + 0.1
    assert checker.background_psnr(img, noisy, ~a) == pytest.approx(20.0)
    assert checker.background_psnr(img, img, ~a) == math.inf


def test_tokenizer_keeps_every_word_whole(tmp_path):
    from zerocon_core.toyworld.model import WORDS, load_tokenizer, write_tokenizer

    tok = load_tokenizer(write_tokenizer(tmp_path / "tok"))
    assert all(len(tok.tokenize(w)) == 1 for w in WORDS)
    ids = tok("a red circle on a striped background").input_ids
    assert len(ids) == 9 and len(set(ids[1:-1])) == 6


def test_edit_set_changes_one_attribute_and_scores_the_ideal_edit_fully():
    cases = edits.edit_set(30)
    assert [c.kind for c in cases[:3]] == list(edits.KINDS)
    assert cases == edits.edit_set(30)
    for case in cases:
        changed = [k for k in edits.KINDS if getattr(case.source, k) != getattr(case.target, k)]
        assert changed == [case.kind]
        ideal = edits.score(case, render(case.target)[0])
        assert ideal["success"] == 1 and ideal["kept"] == 1 and ideal["iou"] == 1
        assert math.isnan(ideal["bg_psnr"]) if case.kind == "background" else ideal["bg_psnr"] == math.inf
        unedited = edits.score(case, render(case.source)[0])
        assert unedited["success"] == 0 and unedited["kept"] == 1
