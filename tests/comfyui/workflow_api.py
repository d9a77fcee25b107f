"""Turn a shipped UI-format workflow (example_workflows/*.json) into the API-format prompt the frontend would queue.

What ComfyUI's frontend does in ``graphToPrompt``, for the node kinds our workflows use: every node that is not
frontend-only (notes) and not muted becomes ``{"class_type", "inputs"}``; ``widgets_values[i]`` goes to the
i-th widget-typed input of the node's schema (required then optional, in input order; a "control after
generate" or an upload button's value follows each input that declares one and is dropped); a linked input (also a widget converted
to an input) becomes ``[source node id, output slot]``.

Then ``swap`` replaces nodes by others with the same outputs (the model loaders by the test-only tiny
checkpoint, image loading by a seeded test image, image saving by a capture node), so the very graph a user
opens runs through ComfyUI's executor with tiny models in the tests.
"""

from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
#: Widgets the frontend adds to a node by itself (not in ``/object_info``) and sends in the prompt, with their value
#: (PreviewAny's text display; the server ignores it).
FRONTEND_WIDGETS = {"PreviewAny": {"preview": ""}}


def node_info(class_type: str) -> dict:
    """``/object_info``'s entry for a node type registered in this process (V3 or V1 schema)."""
    import nodes as comfy_nodes

    cls = comfy_nodes.NODE_CLASS_MAPPINGS[class_type]
    if hasattr(cls, "GET_NODE_INFO_V1"):
        return cls.GET_NODE_INFO_V1()
    spec = cls.INPUT_TYPES()
    return {
        "input": spec,
        "input_order": {k: list(v.keys()) for k, v in spec.items() if isinstance(v, dict)},
    }


def widget_names(info: dict) -> list[str | None]:
    """The input name behind each saved widget value, in the frontend's order (None: a control or upload widget)."""
    out: list[str | None] = []
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        for name in info.get("input_order", {}).get(section, specs):
            spec = specs[name]
            typ, opts = spec[0], spec[1] if len(spec) > 1 else {}
            if isinstance(typ, list) or typ == "COMBO":
                typ = "COMBO"
            if typ not in WIDGET_TYPES or opts.get("forceInput"):
                continue
            out.append(name)
            if opts.get("control_after_generate") or opts.get("image_upload"):
                out.append(None)  # the control / upload widget's own value
    return out


def to_api(workflow: dict, infos: dict | None = None) -> dict:
    """The API-format prompt of a UI-format ``workflow`` (version 0.4), keyed by node id strings.

    ``infos``: a server's ``/object_info`` (default: the node types registered in this process)."""
    links = {ln[0]: ln for ln in workflow.get("links", [])}  # id -> [id, from, from_slot, to, to_slot, type]
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) != 0:
            continue
        info = infos[node["type"]] if infos is not None else node_info(node["type"])
        inputs = dict(FRONTEND_WIDGETS.get(node["type"], {}))
        values = list(node.get("widgets_values") or [])
        names = widget_names(info)
        if len(values) != len(names):
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values for {names}")
        for name, value in zip(names, values):
            if name is not None:
                inputs[name] = value
        for slot in node.get("inputs", []):
            link = slot.get("link")
            if link is not None:
                _, src, src_slot, *_ = links[link]
                inputs[slot["name"]] = [str(src), int(src_slot)]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def validate(prompt: dict, infos: dict) -> list[str]:
    """What ComfyUI's ``validate_prompt`` would reject in ``prompt`` against ``/object_info``, checked here without
    queueing: unknown node types, missing required inputs, links from a missing node or of the wrong type, widget
    values of the wrong type, out of range or not among a combo's options. Returns the problems found."""
    problems = []
    for key, node in prompt.items():
        info = infos.get(node["class_type"])
        if info is None:
            problems.append(f"{key}: unknown node type {node['class_type']}")
            continue
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        for name in info["input"].get("required", {}):
            if name not in node["inputs"]:
                problems.append(f"{key} ({node['class_type']}): required input {name!r} missing")
        for name, value in node["inputs"].items():
            spec = specs.get(name)
            if spec is None:
                continue
            typ, opts = spec[0], spec[1] if len(spec) > 1 else {}
            where = f"{key} ({node['class_type']}).{name} = {value!r}"
            if isinstance(value, list):
                src = prompt.get(value[0])
                if src is None:
                    problems.append(f"{where}: links a node that is not in the prompt")
                    continue
                out_types = infos[src["class_type"]]["output"]
                got = out_types[value[1]]
                want = "COMBO" if isinstance(typ, list) else typ
                if want != "*" and got != "*" and not set(str(got).split(",")) & set(str(want).split(",")):
                    problems.append(f"{where}: output type {got} into input type {want}")
            elif isinstance(typ, list) or typ == "COMBO":
                options = typ if isinstance(typ, list) else opts.get("options", [])
                if value not in options:
                    problems.append(f"{where}: not among {options}")
            elif typ in ("INT", "FLOAT"):
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    problems.append(f"{where}: not a number")
                elif not opts.get("min", value) <= value <= opts.get("max", value):
                    problems.append(f"{where}: outside [{opts.get('min')}, {opts.get('max')}]")
            elif typ == "BOOLEAN" and not isinstance(value, bool):
                problems.append(f"{where}: not a boolean")
            elif typ == "STRING" and not isinstance(value, str):
                problems.append(f"{where}: not a string")
    return problems


def swap(prompt: dict, class_type: str, new_type: str, inputs: dict, outputs: dict[int, int] | None = None) -> int:
    """Replace every node of ``class_type`` by ``new_type`` with ``inputs``; ``outputs`` maps the old output slots
    to the new node's (default: unchanged). Returns how many nodes were replaced."""
    ids = [k for k, v in prompt.items() if v["class_type"] == class_type]
    for k in ids:
        prompt[k] = {"class_type": new_type, "inputs": dict(inputs)}
    if outputs:
        for node in prompt.values():
            for name, value in node["inputs"].items():
                if isinstance(value, list) and len(value) == 2 and value[0] in ids and value[1] in outputs:
                    node["inputs"][name] = [value[0], outputs[value[1]]]
    return len(ids)


def set_widgets(prompt: dict, name: str, value, class_types=None, only_if_larger: bool = True) -> None:
    """Lower (or set) a widget input on every node (of ``class_types``), as the browser test's speed overrides do."""
    for node in prompt.values():
        if class_types and node["class_type"] not in class_types:
            continue
        current = node["inputs"].get(name)
        if current is None or isinstance(current, list):
            continue
        if not only_if_larger or (isinstance(current, (int, float)) and current > value):
            node["inputs"][name] = value
