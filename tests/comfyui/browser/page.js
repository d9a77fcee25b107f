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

  // Visible dialogs and toasts, e.g. the missing-nodes / missing-models dialogs (PrimeVue, frontend 1.27) and the
  // notifications of later frontends (role "status" cards with a "View details" button, frontend 1.49).
  const visible = (el) => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
  const toastCards = () =>
    [...document.querySelectorAll(".p-toast-message, [role=status]")].filter(
      (el) => visible(el) && el.innerText.trim() && !el.parentElement?.closest(".p-toast-message, [role=status]")
    );
  zc.overlays = () => {
    const text = (els) => els.map((el) => el.innerText.trim().slice(0, 2000));
    return { dialogs: text([...document.querySelectorAll(".p-dialog")].filter(visible)), toasts: text(toastCards()) };
  };

  zc.closeOverlays = async () => {
    for (const btn of document.querySelectorAll(".p-dialog .p-dialog-close-button, .p-toast-message .p-toast-close-button")) {
      btn.click();
    }
    for (const card of toastCards()) {
      for (const btn of card.querySelectorAll("button")) {
        if (/close|dismiss/i.test(`${btn.getAttribute("aria-label") ?? ""} ${btn.title ?? ""}`)) btn.click();
      }
    }
    await frame();
  };

  // The text of the smallest visible element that contains every string of `needles` (e.g. a details panel).
  zc.textAround = (needles) => {
    let best = null;
    for (const el of document.body.querySelectorAll("*")) {
      if (!visible(el)) continue;
      const t = el.innerText ?? "";
      if (!needles.every((n) => t.includes(n))) continue;
      if (!best || t.length < best.length) best = t;
    }
    return best;
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

  // ------------------------------------------------------------------ renderers
  // The Vue "Nodes 2.0" renderer is a setting (Comfy.VueNodes.Enabled) that users can switch on in the Settings
  // dialog. Frontends where the setting is missing or hidden (1.27: an unfinished experiment behind a keybinding,
  // which neither sizes nor shows every node) count as having only the canvas.
  const VUE_SETTING = "Comfy.VueNodes.Enabled";
  const settings = () => app.extensionManager?.setting;
  zc.vueAvailable = () => {
    try {
      const def = settings()?.settings?.[VUE_SETTING] ?? app.ui?.settings?.settingsParamLookup?.[VUE_SETTING];
      return !!def && def.type !== "hidden" && settings()?.get?.(VUE_SETTING) !== undefined;
    } catch {
      return false;
    }
  };
  const nodeElements = () => [...document.querySelectorAll("[data-node-id]")].filter((e) => e.classList.contains("lg-node"));

  // Switch the renderer ("vue" or "canvas"); with "vue", wait until every node of the graph has its element and
  // neither their sizes nor the page's resources have changed for `quietMs` (widget components such as the notes'
  // Markdown are loaded lazily and grow their node when they arrive). Returns whether the renderer is now on.
  zc.setRenderer = async (which, quietMs = 1000) => {
    const vue = which === "vue";
    if (vue && !zc.vueAvailable()) return false;
    if (zc.vueAvailable() && !!settings().get(VUE_SETTING) !== vue) await settings().set(VUE_SETTING, vue);
    await document.fonts?.ready;
    let last = "";
    let quiet = 0;
    for (let i = 0; i < 300 && quiet < quietMs; i++) {
      await frame();
      await sleep(100);
      const els = nodeElements();
      if ((vue && els.length < app.graph.nodes.length) || (!vue && els.length)) {
        quiet = 0;
        continue;
      }
      const loaded = performance.getEntriesByType("resource").length; // lazily loaded component chunks
      const now = JSON.stringify([loaded, els.map((e) => [e.offsetWidth, e.offsetHeight])]);
      quiet = now === last ? quiet + 100 : 0;
      last = now;
    }
    app.graph.setDirtyCanvas(true, true);
    await frame();
    return vue ? nodeElements().length >= app.graph.nodes.length : nodeElements().length === 0;
  };

  // Each node's box as the user sees it, in graph units: under Vue its element (title included), on the canvas its
  // title bar and body (pos is the body's top-left; the title is above it).
  zc.nodeBoxes = () => {
    const scale = app.canvas.ds.scale;
    const els = nodeElements();
    if (els.length) {
      return els.map((e) => {
        const r = e.getBoundingClientRect();
        const node = app.graph.getNodeById(e.getAttribute("data-node-id"));
        return { id: e.getAttribute("data-node-id"), type: node?.type, title: node?.title, w: r.width / scale, h: r.height / scale, x: r.x, y: r.y, scale, dom: true };
      });
    }
    const titleH = LiteGraph.NODE_TITLE_HEIGHT || 30;
    return app.graph.nodes.map((n) => ({ id: String(n.id), type: n.type, title: n.title, x: n.pos[0], y: n.pos[1] - titleH, w: n.size[0], h: n.size[1] + titleH, scale: 1, dom: false }));
  };

  // Pairs of nodes whose boxes intersect by more than `tol` graph units either way.
  zc.overlaps = (tol = 1) => {
    const boxes = zc.nodeBoxes();
    const out = [];
    for (let i = 0; i < boxes.length; i++) {
      for (let j = i + 1; j < boxes.length; j++) {
        const a = boxes[i], b = boxes[j];
        const s = a.scale;
        const ox = Math.min(a.x + a.w * s, b.x + b.w * s) - Math.max(a.x, b.x);
        const oy = Math.min(a.y + a.h * s, b.y + b.h * s) - Math.max(a.y, b.y);
        if (ox / s > tol && oy / s > tol) {
          out.push({ a: `${a.id} ${a.title} (${a.type})`, b: `${b.id} ${b.title} (${b.type})`, overlap: [Math.round(ox / s), Math.round(oy / s)] });
        }
      }
    }
    return out;
  };

  // The text result boxes of web/zerocon_text.js that are on screen: [{id, type, text, inNode}] (inNode: the box lies
  // inside its node's element under Vue, or inside the node's rectangle on the canvas).
  zc.resultBoxes = () => {
    const out = [];
    const scale = app.canvas.ds.scale;
    const canvasRect = app.canvas.canvas.getBoundingClientRect();
    for (const node of app.graph.nodes) {
      const w = (node.widgets || []).find((x) => x.name === "zerocon_result");
      if (!w) continue;
      const box = w.element;
      const text = box?.querySelector?.("textarea") ?? box;
      const visible = !!text && text.isConnected && !!(text.offsetWidth || text.offsetHeight) && getComputedStyle(text).visibility !== "hidden";
      let inNode = false;
      let where = null;
      if (visible) {
        const r = text.getBoundingClientRect();
        const el = text.closest("[data-node-id]");
        if (el) {
          inNode = el.getAttribute("data-node-id") === String(node.id);
          where = { box: [r.x, r.y, r.width, r.height], node: el.getAttribute("data-node-id") };
        } else {
          const titleH = LiteGraph.NODE_TITLE_HEIGHT || 30;
          const x0 = canvasRect.x + (node.pos[0] + app.canvas.ds.offset[0]) * scale;
          const y0 = canvasRect.y + (node.pos[1] - titleH + app.canvas.ds.offset[1]) * scale;
          const x1 = x0 + node.size[0] * scale, y1 = y0 + (node.size[1] + titleH) * scale;
          // at least 90 % of the box on the node (a DOM widget's margin may pass the node's edge by a few pixels)
          const ix = Math.max(0, Math.min(r.right, x1) - Math.max(r.x, x0));
          const iy = Math.max(0, Math.min(r.bottom, y1) - Math.max(r.y, y0));
          inNode = ix * iy >= 0.9 * r.width * r.height;
          where = { box: [r.x, r.y, r.right, r.bottom].map(Math.round), node: [x0, y0, x1, y1].map(Math.round) };
        }
      }
      const shown = visible ? text.value ?? text.textContent : null;
      out.push({ id: String(node.id), type: node.type, label: w.label, text: shown, visible, inNode, where });
    }
    return out;
  };

  // Centre the view on a node at `scale` (DOM widgets are hidden when zoomed out or off screen).
  zc.centerOn = async (id, scale = 1) => {
    const node = app.graph.getNodeById(id);
    if (!node) throw new Error(`no node ${id}`);
    const el = app.canvas.canvas;
    const ds = app.canvas.ds;
    ds.scale = scale;
    ds.offset[0] = el.clientWidth / 2 / scale - (node.pos[0] + node.size[0] / 2);
    ds.offset[1] = el.clientHeight / 2 / scale - (node.pos[1] + node.size[1] / 2);
    app.graph.setDirtyCanvas(true, true);
    for (let i = 0; i < 3; i++) {
      await frame();
      await sleep(100);
    }
  };

  // What web/zerocon_text.js shows after a run, without running: each node of `types` gets a text result.
  zc.simulateResults = async (types, text) => {
    const done = [];
    for (const node of app.graph.nodes) {
      if (!types.includes(node.type)) continue;
      node.onExecuted?.({ text: [text] });
      done.push(node.id);
    }
    app.graph.setDirtyCanvas(true, true);
    await frame();
    return done;
  };

  // ------------------------------------------------------------------ building drafts
  // spec: {nodes: [{key, type, col, title?, widgets: {name: value}, size?, mode?, color?, bgcolor?, properties?}],
  //        links: [[fromKey, output (name|index), toKey, input (name|index)]],
  //        groups: [{title, keys: [...], color?}], columns: {x0, dx, y0, gap, colX?},
  //        slots?: {key: height}}
  // slots: the height (title included, graph units) each node needs in its column, measured by zc.measure on every
  // frontend and renderer the file must suit; without it, the node's own size here.
  const settle = async () => {
    // LoadImage and other previews resize their node once the image has loaded.
    let last = "";
    for (let i = 0; i < 40; i++) {
      await sleep(100);
      await frame();
      const now = JSON.stringify(app.graph.nodes.map((n) => n.size));
      if (now === last && i >= 3) break;
      last = now;
    }
  };

  zc.build = async (spec) => {
    await zc.setRenderer("canvas");
    app.graph.clear();
    // A stable workflow id (rebuilding gives the same file), set before the nodes exist: later frontends key each
    // widget's value by the graph's id, and a node created under another id shows empty widgets under Vue.
    if (spec.id) app.graph.id = spec.id;
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
    await settle();
    // Column layout: nodes stacked top to bottom in spec order within their column, each in a slot of the height
    // it needs (its title and body here, or spec.slots: on every renderer, with its text result shown).
    const titleH = LiteGraph.NODE_TITLE_HEIGHT || 30;
    const slots = spec.slots || {};
    const slotOf = (n) => Math.max(titleH + byKey[n.key].size[1], slots[n.key] || 0);
    for (const n of spec.nodes) {
      const node = byKey[n.key];
      const col = n.col ?? 0;
      const x = layout.colX ? layout.colX[col] : layout.x0 + col * layout.dx;
      const y = cols[col] ?? layout.y0;
      node.pos = [x, y + titleH + (n.dy || 0)];
      cols[col] = y + (n.dy || 0) + slotOf(n) + (n.gap ?? layout.gap);
    }
    for (const n of spec.nodes) if (n.mode != null) byKey[n.key].mode = n.mode;
    // Groups around their nodes' slots (bounds from pos/size: node.boundingRect is only refreshed when drawn).
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
        const n = spec.nodes.find((m) => m.key === k);
        x0 = Math.min(x0, node.pos[0]);
        y0 = Math.min(y0, node.pos[1] - titleH);
        x1 = Math.max(x1, node.pos[0] + node.size[0]);
        y1 = Math.max(y1, node.pos[1] - titleH + slotOf(n));
      }
      group.pos = [x0 - pad, y0 - pad - gTitle];
      group.size = [x1 - x0 + 2 * pad, y1 - y0 + 2 * pad + gTitle];
    }
    app.graph.setDirtyCanvas(true, true);
    await frame();
    const ids = {};
    for (const [k, node] of Object.entries(byKey)) ids[k] = node.id;
    return ids;
  };

  // Build `spec` and measure, per node key, the height (title included, graph units) and width it takes on this
  // frontend: on the canvas and, where the frontend has it, under Vue nodes, each with the text result that
  // web/zerocon_text.js adds after a run on the node types of `resultTypes` (`sample`: the text simulated).
  zc.measure = async (spec, resultTypes, sample) => {
    const ids = await zc.build(spec);
    const titleH = LiteGraph.NODE_TITLE_HEIGHT || 30;
    const out = {};
    for (const [k, id] of Object.entries(ids)) {
      const n = app.graph.getNodeById(id);
      out[k] = { canvas: [n.size[0], titleH + n.size[1]] };
    }
    await zc.simulateResults(resultTypes, sample);
    await settle();
    for (const [k, id] of Object.entries(ids)) {
      const n = app.graph.getNodeById(id);
      out[k].canvasResult = [n.size[0], titleH + n.size[1]];
    }
    if (await zc.setRenderer("vue")) {
      for (const box of zc.nodeBoxes()) {
        const k = Object.keys(ids).find((key) => String(ids[key]) === box.id);
        if (k) out[k].vueResult = [box.w, box.h];
      }
      await zc.setRenderer("canvas");
    }
    return out;
  };

  window.__zc = zc;
})();
