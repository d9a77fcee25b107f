"""The shipped workflows' widget values fit the nodes' schemas, as the frontend maps them: by position.

ComfyUI's frontend (LiteGraph ``LGraphNode.configure``) assigns ``widgets_values[i]`` to the i-th widget of
the node it builds from ``/object_info``: one widget per widget-typed input (INT, FLOAT, STRING, BOOLEAN,
COMBO) in input order, required then optional, plus a "control after generate" widget right after each input
that declares one. A new input inserted before existing widgets would shift every saved value after it;
one appended at the end leaves older workflows loading with its default. This is the browser-free check of
that mapping (tests/comfyui/test_browser_workflows.py loads the files in the real frontend).
"""

from __future__ import annotations

import json

import pytest
from conftest import REPO, node_infos

WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
#: Combos listing the files of a models folder (empty here): only the value's type is checked.
FILE_LISTS = {"ZeroConLoadEditDirection.name"}


@pytest.fixture(scope="module")
def infos():
    return node_infos()


def expected_widgets(info) -> list[tuple[str, str, dict]]:
    """(name, type, options) of each widget, in the frontend's order; "control" widgets after seeds."""
    out = []
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        for name in info["input_order"].get(section, specs):
            spec = specs[name]
            typ, opts = spec[0], spec[1] if len(spec) > 1 else {}
            if isinstance(typ, list):
                typ, opts = "COMBO", {**opts, "options": typ}
            if typ not in WIDGET_TYPES or opts.get("forceInput"):
                continue
            out.append((name, typ, opts))
            if opts.get("control_after_generate"):
                out.append((f"{name} (control after generate)", "control", {}))
    return out


def check_value(label: str, node_type: str, name: str, typ: str, opts: dict, value) -> None:
    where = f"{label}.{name} = {value!r}"
    if typ == "control":
        assert value in CONTROL_VALUES, where
    elif typ == "BOOLEAN":
        assert isinstance(value, bool), where
    elif typ in ("INT", "FLOAT"):
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
        if typ == "INT":
            assert float(value).is_integer(), where
        assert opts.get("min", value) <= value <= opts.get("max", value), f"{where} out of range"
    elif typ == "STRING":
        assert isinstance(value, str), where
    elif typ == "COMBO" and f"{node_type}.{name}" in FILE_LISTS:
        assert isinstance(value, str), where
    elif typ == "COMBO":
        assert value in opts["options"], f"{where} not among {opts['options']}"


def test_there_are_workflows():
    assert WORKFLOWS, "no example_workflows/*.json"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_widget_values_fit_the_schemas_by_position(infos, path):
    workflow = json.loads(path.read_text())
    checked = 0
    for node in workflow["nodes"]:
        if not node["type"].startswith("ZeroCon"):
            continue
        assert node["type"] in infos, f"{path.name}: unknown node type {node['type']}"
        widgets = expected_widgets(infos[node["type"]])
        values = node.get("widgets_values") or []
        label = f"{path.name} node {node['id']} ({node['type']})"
        assert len(values) == len(widgets), f"{label}: {len(values)} values for widgets {[w[0] for w in widgets]}"
        for (name, typ, opts), value in zip(widgets, values):
            check_value(label, node["type"], name, typ, opts, value)
        checked += 1
    assert checked, f"{path.name} has no ZeroCon node"


def test_the_check_catches_a_shifted_value(infos):
    """An inserted widget shifts the saved values: the check must fail on the shifted list."""
    widgets = expected_widgets(infos["ZeroConDDIMInversion"])
    assert [w[0] for w in widgets][:3] == ["steps", "cfg", "regularize"]
    saved = [50, 1.0, True, 20.0, 20.0, 5, 5, 0, "fixed"]
    for (name, typ, opts), value in zip(widgets, saved):
        check_value("ok", "ZeroConDDIMInversion", name, typ, opts, value)
    shifted = ["current", *saved]
    with pytest.raises(AssertionError):
        for (name, typ, opts), value in zip(widgets, shifted):
            check_value("shifted", "ZeroConDDIMInversion", name, typ, opts, value)
