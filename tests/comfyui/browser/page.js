// Helpers injected into the ComfyUI frontend page by tests/comfyui/browser/frontend.py.
// Everything goes through the frontend's own objects: window.app (ComfyApp), window.LiteGraph, app.api.
// Nothing here talks to the server directly except through app.api.
(() => {
  if (window.__zc) return;
  const app = window.app;
  const LiteGraph = window.LiteGraph;
  const zc = {
    missing: null, // node types the last loadGraphData could not find (from the afterConfigureGraph hook)
  };

  app.registerExtension({
    name: "zerocon.browser-test",
    afterConfigureGraph(missingNodeTypes) {
      zc.missing = (missingNodeTypes || []).map((m) => (typeof m === "string" ? m : m.type));
    },
  });

  const frame = () => new Promise((r) => requestAnimationFrame(() => r()));
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  // Visible dialogs and toasts (PrimeVue), e.g. the missing-nodes / missing-models dialogs, error toasts.
  zc.overlays = () => {
    const visible = (el) => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
    const text = (sel) =>
      [...document.querySelectorAll(sel)].filter(visible).map((el) => el.innerText.trim().slice(0, 2000));
    return { dialogs: text(".p-dialog"), toasts: text(".p-toast-message") };
  };

  zc.closeOverlays = async () => {
    for (const btn of document.querySelectorAll(".p-dialog .p-dialog-close-button, .p-toast-message .p-toast-close-button")) {
      btn.click();
    }
    await frame();
  };

  // Every combo widget whose value is not one of its options (what the server would reject).
  zc.invalidCombos = () => {
    const bad = [];
    for (const node of app.graph.nodes) {
      if (node.mode === 2 || node.mode === 4) continue; // muted / bypassed: never sent to the server
      for (const w of node.widgets || []) {
        if (w.type !== "combo") continue;
        let values = w.options?.values;
        if (typeof values === "function") values = values(w, node);
        if (!Array.isArray(values)) continue;
        if (!values.includes(w.value)) bad.push({ id: node.id, type: node.type, widget: w.name, value: w.value, options: values.slice(0, 20) });
      }
    }
    return bad;
  };

  zc.load = async (graph) => {
    zc.missing = null;
    await zc.closeOverlays();
    await app.loadGraphData(graph, true, true, null);
    await frame();
    await sleep(300);
    await frame();
    return zc.state();
  };

  zc.state = () => ({
    missing: zc.missing,
    registered: Object.keys(LiteGraph.registered_node_types).length,
    nodes: app.graph.nodes.length,
    invalidCombos: zc.invalidCombos(),
    overlays: zc.overlays(),
  });

  // What the frontend writes when a user exports the workflow (Workflow > Export): graphToPrompt's workflow.
  zc.exportWorkflow = async () => {
    const p = await app.graphToPrompt();
    return JSON.stringify(p.workflow, null, 2);
  };

  zc.serialize = () => app.graph.serialize();

  // Set widget values like a user editing them: [{id?, type?, name, value}] -> list of changes made.
  zc.setWidgets = (changes) => {
    const done = [];
    for (const c of changes) {
      for (const node of app.graph.nodes) {
        if (c.id != null && node.id !== c.id) continue;
        if (c.type != null && node.type !== c.type) continue;
        const w = (node.widgets || []).find((x) => x.name === c.name);
        if (!w) continue;
        const before = w.value;
        if (c.only_if_larger && !(typeof before === "number" && before > c.value)) continue;
        w.value = c.value;
        w.callback?.(w.value, app.canvas, node);
        done.push({ id: node.id, type: node.type, name: c.name, before, after: w.value });
      }
    }
    app.graph.setDirtyCanvas(true, true);
    return done;
  };

  zc.setModes = (changes) => {
    // [{id?, type?, mode}] mode: 0 always, 2 never (muted), 4 bypass
    const done = [];
    for (const c of changes) {
      for (const node of app.graph.nodes) {
        if (c.id != null && node.id !== c.id) continue;
        if (c.type != null && node.type !== c.type) continue;
        node.mode = c.mode;
        done.push({ id: node.id, type: node.type, mode: c.mode });
      }
    }
    app.graph.setDirtyCanvas(true, true);
    return done;
  };

  zc.refreshCombos = async () => {
    await app.refreshComboInNodes();
    await frame();
  };

  // graphToPrompt's API-format prompt (what Queue would send), without queueing it.
  zc.prompt = async () => (await app.graphToPrompt()).output;

  // graphToPrompt through the frontend, then queue it through the frontend's API client.
  zc.queue = async () => {
    const p = await app.graphToPrompt();
    try {
      const res = await app.api.queuePrompt(0, p);
      return { ok: true, response: res, prompt: p.output };
    } catch (e) {
      return { ok: false, error: e?.response ?? String(e), prompt: p.output };
    }
  };

  // Fit view, wait for its animation to end, and round the view (a rebuilt workflow gets the same numbers).
  zc.fitView = async () => {
    await app.extensionManager.command.execute("Comfy.Canvas.FitView");
    let last = "";
    for (let i = 0; i < 50; i++) {
      await sleep(100);
      await frame();
      const now = JSON.stringify([app.canvas.ds.scale, ...app.canvas.ds.offset]);
      if (now === last) break;
      last = now;
    }
    const ds = app.canvas.ds;
    ds.scale = Math.round(ds.scale * 100) / 100;
    ds.offset[0] = Math.round(ds.offset[0]);
    ds.offset[1] = Math.round(ds.offset[1]);
    app.graph.setDirtyCanvas(true, true);
    await frame();
  };

  // ------------------------------------------------------------------ building drafts
  // spec: {nodes: [{key, type, col, title?, widgets: {name: value}, size?, mode?, color?, bgcolor?, properties?}],
  //        links: [[fromKey, output (name|index), toKey, input (name|index)]],
  //        groups: [{title, keys: [...], color?}], columns: {x0, dx, y0, gap}}
  zc.build = async (spec) => {
    app.graph.clear();
    await frame();
    const byKey = {};
    const cols = {};
    const layout = Object.assign({ x0: 0, dx: 450, y0: 0, gap: 60, colX: null }, spec.columns || {});
    for (const n of spec.nodes) {
      const node = LiteGraph.createNode(n.type, n.title);
      if (!node) throw new Error(`cannot create node ${n.type}`);
      app.graph.add(node);
      if (n.title) node.title = n.title;
      if (n.properties) Object.assign(node.properties, n.properties);
      for (const [name, value] of Object.entries(n.widgets || {})) {
        const w = (node.widgets || []).find((x) => x.name === name);
        if (!w) throw new Error(`${n.type} has no widget ${name}: ${(node.widgets || []).map((x) => x.name)}`);
        w.value = value;
      }
      if (n.color) node.color = n.color;
      if (n.bgcolor) node.bgcolor = n.bgcolor;
      const size = node.computeSize();
      if (n.size) {
        node.size = [Math.max(n.size[0], n.fixed ? 0 : size[0]), Math.max(n.size[1], n.fixed ? 0 : size[1])];
      } else {
        node.size = [Math.max(size[0], n.width || 340), size[1]];
      }
      byKey[n.key] = node;
    }
    for (const [a, out, b, inp] of spec.links || []) {
      const src = byKey[a], dst = byKey[b];
      if (!src || !dst) throw new Error(`link ${a} -> ${b}: unknown node`);
      const o = typeof out === "number" ? out : src.findOutputSlot(out);
      const i = typeof inp === "number" ? inp : dst.findInputSlot(inp);
      if (o < 0) throw new Error(`${src.type} has no output ${out}: ${src.outputs.map((x) => x.name)}`);
      if (i < 0) throw new Error(`${dst.type} has no input ${inp}: ${dst.inputs.map((x) => x.name)}`);
      const link = src.connect(o, dst, i);
      if (!link) throw new Error(`could not connect ${a}.${out} -> ${b}.${inp}`);
    }
    // Column layout: nodes stacked top to bottom in spec order within their column.
    const titleH = LiteGraph.NODE_TITLE_HEIGHT || 30;
    for (const n of spec.nodes) {
      const node = byKey[n.key];
      const col = n.col ?? 0;
      const x = layout.colX ? layout.colX[col] : layout.x0 + col * layout.dx;
      const y = cols[col] ?? layout.y0;
      node.pos = [x, y + titleH + (n.dy || 0)];
      cols[col] = y + titleH + (n.dy || 0) + node.size[1] + (n.gap ?? layout.gap);
    }
    for (const n of spec.nodes) if (n.mode != null) byKey[n.key].mode = n.mode;
    // Groups around their nodes (bounds from pos/size: node.boundingRect is only refreshed when drawn).
    for (const g of spec.groups || []) {
      const group = new LiteGraph.LGraphGroup(g.title);
      if (g.color) group.color = g.color;
      app.graph.add(group);
      const pad = g.padding ?? 20;
      const gTitle = group.titleHeight ?? titleH;
      let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
      for (const k of g.keys) {
        const node = byKey[k];
        if (!node) throw new Error(`group ${g.title}: unknown node ${k}`);
        x0 = Math.min(x0, node.pos[0]);
        y0 = Math.min(y0, node.pos[1] - titleH);
        x1 = Math.max(x1, node.pos[0] + node.size[0]);
        y1 = Math.max(y1, node.pos[1] + node.size[1]);
      }
      group.pos = [x0 - pad, y0 - pad - gTitle];
      group.size = [x1 - x0 + 2 * pad, y1 - y0 + 2 * pad + gTitle];
    }
    if (spec.id) app.graph.id = spec.id; // a stable workflow id: rebuilding gives the same file
    app.graph.setDirtyCanvas(true, true);
    await frame();
    const ids = {};
    for (const [k, node] of Object.entries(byKey)) ids[k] = node.id;
    return ids;
  };

  window.__zc = zc;
})();
