// Shows a ZeroCon node's text result (ui "text": captions, metric summaries, "saved ..." messages) on the
// node itself, in a read-only box labelled "result", as the core Preview Any node does. The box is neither saved
// with the workflow nor sent with the prompt (so it never changes the node's inputs, nor ComfyUI's cache of its
// result).
//
// Only the frontend's public extension API is used: `app.registerExtension` and the node's own `addDOMWidget`
// (both in frontend 1.27 and 1.49), chosen by feature detection, never by a version number. The box is our own
// element, so it is the same under the classic canvas and the Vue "Nodes 2.0" renderer (which mounts a DOM
// widget of a type it has no component for as it is). A frontend whose nodes have no addDOMWidget gets a
// plain one-line text widget instead.
import { app } from "../../scripts/app.js";

const WIDGET = "zerocon_result"; // the widget's name (internal; never serialized)
const LABEL = "result"; // what the user reads
const TYPE = "zerocon_result"; // a DOM widget type of our own: both renderers show our element
const MIN_HEIGHT = 64;

function resultBox() {
  const box = document.createElement("div");
  box.className = "zerocon-result";
  box.dataset.zeroconResult = "";
  Object.assign(box.style, { display: "flex", flexDirection: "column", gap: "2px", minHeight: `${MIN_HEIGHT}px` });
  const label = document.createElement("span");
  label.textContent = LABEL;
  Object.assign(label.style, { fontSize: "10px", opacity: "0.7", paddingLeft: "4px", userSelect: "none" });
  const text = document.createElement("textarea");
  text.className = "comfy-multiline-input";
  text.readOnly = true;
  text.spellcheck = false;
  text.setAttribute("aria-label", LABEL);
  Object.assign(text.style, { flex: "1 1 auto", minHeight: `${MIN_HEIGHT - 16}px`, resize: "none", width: "100%" });
  box.append(label, text);
  return { box, text };
}

function addResultWidget(node) {
  let widget;
  if (typeof node.addDOMWidget === "function") {
    const { box, text } = resultBox();
    widget = node.addDOMWidget(WIDGET, TYPE, box, {
      getValue: () => text.value,
      setValue: (v) => {
        text.value = v ?? "";
      },
      getMinHeight: () => MIN_HEIGHT,
      serialize: false, // not in the prompt
    });
  } else {
    widget = node.addWidget("text", WIDGET, "", () => {}, { serialize: false });
  }
  widget.label = LABEL;
  widget.serialize = false; // not in the workflow's widgets_values
  widget.options ??= {};
  widget.options.serialize = false; // not in the prompt
  widget.options.read_only = true;
  return widget;
}

app.registerExtension({
  name: "ZeroCon.NodeText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("ZeroCon")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (text === undefined || text === null) return;
      let widget = this.widgets?.find((w) => w.name === WIDGET);
      const added = !widget;
      if (added) widget = addResultWidget(this);
      widget.value = Array.isArray(text) ? text.join("\n") : String(text);
      if (added) {
        const size = this.computeSize();
        this.setSize([Math.max(this.size[0], size[0]), Math.max(this.size[1], size[1])]);
      }
      this.setDirtyCanvas?.(true, true);
    };
  },
});
