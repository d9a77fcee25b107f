"""The shared input declarations (nodes/glue/inputs.py): every node that has one of these inputs declares it the same
way, every node is in the one category, and each call builds fresh input objects."""

from __future__ import annotations

import pytest
from conftest import node_infos, pack_module

SHARED = ("seed", "steps", "cfg", "step_mode", "step_size", "start", "end", "previous")
#: What may differ between nodes per shared input (the rest of the declaration must be identical).
MAY_DIFFER = {
    "seed": {"tooltip"},  # what it seeds
    "steps": {"tooltip"},
    "cfg": {"tooltip", "default"},  # 1 for inversion, 5 for sampling
    "step_mode": {"tooltip"},  # names whose "raw" step it is
}


@pytest.fixture(scope="module")
def infos():
    return node_infos()


def _inputs(info) -> dict:
    return {**info["input"].get("required", {}), **info["input"].get("optional", {})}


def test_every_node_is_in_the_shared_category(infos):
    category = pack_module("nodes.glue.inputs").CATEGORY
    assert category == "image/translation/zerocon"
    assert {info["category"] for info in infos.values()} == {category}


@pytest.mark.parametrize("name", SHARED)
def test_shared_inputs_are_declared_alike(infos, name):
    specs = {node: _inputs(info)[name] for node, info in infos.items() if name in _inputs(info)}
    assert len(specs) >= 2, f"{name} is not shared: {sorted(specs)}"
    allowed = MAY_DIFFER.get(name, set())
    first_node, first = next(iter(specs.items()))
    for node, spec in specs.items():
        assert spec[0] == first[0], f"{node}.{name} has type {spec[0]}, {first_node}.{name} {first[0]}"
        a = {k: v for k, v in spec[1].items() if k not in allowed}
        b = {k: v for k, v in first[1].items() if k not in allowed}
        assert a == b, f"{node}.{name} differs from {first_node}.{name}: {a} != {b}"


def test_seed_and_step_inputs_keep_their_ranges(infos):
    seed = _inputs(infos["ZeroConGuidedSampler"])["seed"][1]
    assert (seed["default"], seed["min"], seed["max"], seed["control_after_generate"]) == (0, 0, 2**64 - 1, True)
    mode = _inputs(infos["ZeroConDiffuseITSampler"])["step_mode"][1]
    assert mode["options"] == ["auto", "raw", "normalized"] and mode["default"] == "auto"
    assert "DiffuseIT's step" in mode["tooltip"]
    assert "pix2pix-zero's step" in _inputs(infos["ZeroConGuidedDDIMSampler"])["step_mode"][1]["tooltip"]


def test_each_call_builds_new_inputs():
    inputs = pack_module("nodes.glue.inputs")
    a, b = inputs.window_inputs(), inputs.window_inputs()
    assert [i.id for i in a] == ["start", "end"] and all(x is not y for x, y in zip(a, b))
    assert inputs.seed_input("x") is not inputs.seed_input("x")
    assert inputs.seed_input("what it seeds").tooltip == "what it seeds"
