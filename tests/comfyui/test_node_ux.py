"""What the user sees on the nodes: text results shown on the node (the pack's frontend script), Save Edit
Direction refusing to replace a file unless asked, and the experimental flag of the DiffuseIT nodes."""

from __future__ import annotations

import asyncio

import pytest
import tiny_clip
import torch
from conftest import REPO, pack_fixture
from test_text_nodes import model_dirs  # noqa: F401  (fixture: temporary models/edit_directions)

DIFFUSEIT_NODES = ("ZeroConDinoStructureGuidance", "ZeroConDinoStyleGuidance", "ZeroConDiffuseITSampler")


dn = pack_fixture("nodes.classes.direction_nodes")


def _direction(dn):
    with torch.inference_mode():
        return dn.ZeroConEditDirection.execute(
            clip=tiny_clip.clip("sd1", seed=3),
            source="cat",
            target="dog",
            mode="sentence bank",
            num_sentences=2,
            batch_size=4,
        ).args[0]


def test_save_does_not_overwrite_by_default(dn, model_dirs):  # noqa: F811
    schema = dn.ZeroConSaveEditDirection.define_schema()
    last = schema.inputs[-1]
    assert last.id == "overwrite" and last.default is False  # last: older workflows keep their widget order
    direction = _direction(dn)
    path = model_dirs / "edit_directions" / "keep.safetensors"
    with torch.inference_mode():
        out = dn.ZeroConSaveEditDirection.execute(direction=direction, filename="keep")
    assert out.ui.as_dict() == {"text": (f"saved {direction.describe()} to {path}",)}
    before = path.read_bytes()
    other = _direction(dn)
    other.target = "horse"
    with pytest.raises(FileExistsError) as err, torch.inference_mode():
        dn.ZeroConSaveEditDirection.execute(direction=other, filename="keep")
    assert str(path) in str(err.value) and "turn on overwrite or choose another name" in str(err.value)
    assert path.read_bytes() == before
    with torch.inference_mode():
        dn.ZeroConSaveEditDirection.execute(direction=other, filename="keep", overwrite=True)
    assert path.read_bytes() != before


def test_diffuseit_nodes_are_flagged_experimental():
    import nodes as comfy_nodes

    assert asyncio.run(comfy_nodes.load_custom_node(str(REPO)))
    mapping = comfy_nodes.NODE_CLASS_MAPPINGS
    ours = [k for k in mapping if k.startswith("ZeroCon") and not k.startswith("ZeroConTest_")]
    assert set(DIFFUSEIT_NODES) <= set(ours)
    for key in ours:
        info = mapping[key].GET_NODE_INFO_V1()
        assert info["experimental"] is (key in DIFFUSEIT_NODES), key


def test_the_frontend_script_is_served():
    import nodes as comfy_nodes

    assert asyncio.run(comfy_nodes.load_custom_node(str(REPO)))
    web = [d for d in comfy_nodes.EXTENSION_WEB_DIRS.values() if d.startswith(str(REPO))]
    assert web == [str(REPO / "web")]
    script = (REPO / "web" / "zerocon_text.js").read_text()
    assert "onExecuted" in script and "message?.text" in script and 'startsWith("ZeroCon")' in script
    # kept out of the saved workflow and out of the prompt (an extra prompt input would change the cache key)
    assert "widget.serialize = false" in script and "widget.options.serialize = false" in script
    # labelled for the user, not with the widget's internal name
    assert 'const LABEL = "result"' in script and "widget.label = LABEL" in script


def test_web_scripts_import_only_the_public_frontend_api():
    """The frontend's public modules are scripts/app.js and scripts/api.js; the others (widgets.js, domWidget.js,
    ui.js, ...) print "internal module" / "deprecated" notices on every page load from frontend 1.4x on and may go."""
    import re

    for path in sorted((REPO / "web").rglob("*.js")):
        imports = re.findall(r"""^\s*import\s[^;]*?from\s+["']([^"']+)["']""", path.read_text(), re.M)
        frontend = [m for m in imports if "/scripts/" in m or "/extensions/core/" in m]
        assert all(re.search(r"/scripts/(app|api)\.js$", m) for m in frontend), f"{path.name}: {frontend}"
