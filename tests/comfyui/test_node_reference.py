"""docs/nodes.md is generated from the node schemas (tools/node_reference.py) and must be up to date."""

from __future__ import annotations

import difflib

from conftest import REPO, module_from_file, pack_module


def _tool():
    return module_from_file("zerocon_node_reference", REPO / "tools" / "node_reference.py")


def test_docs_nodes_md_matches_the_schemas():
    text = _tool().render(pack_module("nodes").collect_nodes())
    saved = (REPO / "docs" / "nodes.md").read_text()
    diff = "".join(difflib.unified_diff(saved.splitlines(True), text.splitlines(True), "docs/nodes.md", "schemas"))
    assert not diff, (
        "docs/nodes.md is out of date; regenerate it with "
        "`COMFYUI_PATH=~/ComfyUI <comfy-python> tools/node_reference.py > docs/nodes.md`:\n" + diff[:4000]
    )


def test_local_model_folders_do_not_leak_into_the_reference(tmp_path):
    """A model folder on the generating machine must not appear in the reference (it shows a fresh install)."""
    import folder_paths

    (tmp_path / "blip" / "my-local-blip").mkdir(parents=True)
    (tmp_path / "blip" / "my-local-blip" / "config.json").write_text("{}")
    (tmp_path / "edit_directions").mkdir()
    (tmp_path / "edit_directions" / "mine.safetensors").write_bytes(b"")
    pack_module("nodes.glue.paths")
    saved = {
        k: (list(v[0]), set(v[1]))
        for k, v in folder_paths.folder_names_and_paths.items()
        if k in ("blip", "edit_directions")
    }
    try:
        for key in saved:
            folder_paths.add_model_folder_path(key, str(tmp_path / key), is_default=True)
        folder_paths.filename_list_cache.clear()
        nodes = pack_module("nodes").collect_nodes()
        blip = next(n for n in nodes if n.GET_SCHEMA().node_id == "ZeroConBLIPLoader")
        assert "my-local-blip" in str(blip.GET_NODE_INFO_V1()["input"])  # the menu does list it
        text = _tool().render(nodes)
    finally:
        folder_paths.folder_names_and_paths.update(saved)
        folder_paths.filename_list_cache.clear()
    assert "my-local-blip" not in text and "mine.safetensors" not in text
    assert "blip-image-captioning-base" in text
