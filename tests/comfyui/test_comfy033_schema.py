"""The node schema fields ComfyUI added after 0.3.64, used where the running ComfyUI has them.

- every node has search aliases (``search_aliases`` in the node info on a ComfyUI whose Schema knows the field;
  left out, not refused, on one that does not);
- the DiffuseIT nodes the README calls experimental carry the schema's experimental flag.
"""

from __future__ import annotations

import dataclasses

from comfy_api.latest import io
from conftest import node_infos, pack_module

EXPERIMENTAL = {"ZeroConDinoStructureGuidance", "ZeroConDinoStyleGuidance", "ZeroConDiffuseITSampler"}


def test_every_node_has_search_aliases_where_comfyui_supports_them():
    infos = node_infos()
    aliases = pack_module("nodes.glue.inputs").SEARCH_ALIASES
    assert set(aliases) == set(infos)  # one entry per node, none for a node that does not exist
    supported = "search_aliases" in {f.name for f in dataclasses.fields(io.Schema)}
    for node_id, info in infos.items():
        if supported:
            assert info.get("search_aliases") == aliases[node_id] and aliases[node_id], node_id
        else:
            assert not info.get("search_aliases"), node_id


def test_schema_keeps_only_the_fields_this_comfyui_knows():
    schema = pack_module("nodes.glue.inputs").schema
    s = schema(node_id="ZeroConGuidedSampler", display_name="x", category="c", a_field_from_the_future=True)
    assert s.node_id == "ZeroConGuidedSampler" and not hasattr(s, "a_field_from_the_future")


def test_experimental_nodes_are_flagged():
    infos = node_infos()
    flagged = {node_id for node_id, info in infos.items() if info.get("experimental")}
    assert flagged == EXPERIMENTAL
