"""Compare two UI-format workflows node by node (what the frontend kept of a file after loading it)."""

from __future__ import annotations


def _norm_links(links) -> set:
    out = set()
    for link in links or []:
        if isinstance(link, dict):  # v1 object-style links
            out.add((link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"], link["type"]))
        else:
            out.add(tuple(link[1:6]))
    return out


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)))
        except (TypeError, ValueError):
            return False
    return a == b


def graph_differences(saved: dict, loaded: dict) -> list[str]:
    """Differences in node set, types, modes, widget values and links; [] when the frontend kept everything."""
    diffs = []
    a = {n["id"]: n for n in saved.get("nodes", [])}
    b = {n["id"]: n for n in loaded.get("nodes", [])}
    if set(a) != set(b):
        diffs.append(
            f"node ids differ: only in file {sorted(set(a) - set(b))}, only after load {sorted(set(b) - set(a))}"
        )
    for nid in sorted(set(a) & set(b)):
        na, nb = a[nid], b[nid]
        if na["type"] != nb["type"]:
            diffs.append(f"node {nid}: type {na['type']} -> {nb['type']}")
        if na.get("mode", 0) != nb.get("mode", 0):
            diffs.append(f"node {nid} ({na['type']}): mode {na.get('mode')} -> {nb.get('mode')}")
        wa, wb = na.get("widgets_values") or [], nb.get("widgets_values") or []  # no widgets: absent or []
        if isinstance(wa, list) and isinstance(wb, list):
            if len(wa) != len(wb) or not all(_same(x, y) for x, y in zip(wa, wb)):
                diffs.append(f"node {nid} ({na['type']}): widgets_values {wa!r} -> {wb!r}")
        elif wa != wb:
            diffs.append(f"node {nid} ({na['type']}): widgets_values {wa!r} -> {wb!r}")
    la, lb = _norm_links(saved.get("links")), _norm_links(loaded.get("links"))
    if la != lb:
        diffs.append(f"links differ: only in file {sorted(la - lb)}, only after load {sorted(lb - la)}")
    return diffs
