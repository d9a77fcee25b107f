// Shows a ZeroCon node's text result (ui "text": captions, metric summaries, "saved ..." messages) on the
// node itself, in a read-only box, as the core Preview Any node does. The box is neither saved with the workflow
// nor sent with the prompt (so it never changes the node's inputs, nor ComfyUI's cache of its result).
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const WIDGET = "zerocon_result";

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
      if (!widget) {
        widget = ComfyWidgets["STRING"](this, WIDGET, ["STRING", { multiline: true }], app).widget;
        widget.element.readOnly = true;
        widget.serialize = false; // not in the workflow's widgets_values
        widget.options ??= {};
        widget.options.serialize = false; // not in the prompt
        const size = this.computeSize();
        this.setSize([Math.max(this.size[0], size[0]), Math.max(this.size[1], size[1])]);
      }
      widget.value = Array.isArray(text) ? text.join("\n") : String(text);
      this.setDirtyCanvas?.(true, true);
    };
  },
});
