"""One auto-weight rule for the nodes and the pipeline/CLI, on the same tiny v-prediction (and eps) ComfyUI model.

Nodes path: the guidance nodes with their default (auto) weight, resolved as the samplers resolve them
(``guidance_nodes.resolve_weights`` with the MODEL's detected family). Pipeline/CLI path:
``pipeline.default_guidance`` with no weights given, for the prediction type the engine's denoiser reports
for that same MODEL. Both must give the documented values: in step mode "raw" cross-attention 0.01 /
PatchNCE 0.05 on v-prediction, 0.1 / 0.5 on eps; in step mode "auto" the ratios 1 / 1 on every family.
"""

from __future__ import annotations

import pytest
import sampling_helpers as h
from conftest import pack_module

DOCUMENTED = {"sd2v": (0.01, 0.05), "sd15": (0.1, 0.5), "sdxl": (0.1, 0.5)}


def _node_terms(zc, run):
    """The cross-attention + PatchNCE node chain with their default (auto) weights, 256 patches."""
    return h.guidance(zc, run, xa=zc.guidance.AUTO, nce=zc.guidance.AUTO, patches=256)


@pytest.mark.parametrize("mode", ["raw", "auto"])
@pytest.mark.parametrize("name", list(DOCUMENTED))
def test_nodes_and_pipeline_resolve_the_same_weights(zc, run, name, mode):
    import tiny_models

    model = getattr(tiny_models, name)()
    pipeline = pack_module("zerocon_core.diffusers_host.pipeline")

    family = zc.families.detect_family(model)
    nodes = zc.guidance.resolve_weights(_node_terms(zc, run), family, mode)

    den = zc.denoiser.ComfyDenoiser(model.model, model_sampling=model.get_model_object("model_sampling"))
    assert den.prediction_type == ("v" if name == "sd2v" else "eps")
    cli = pipeline.default_guidance(den.prediction_type, step_mode=mode)

    assert [type(t).__name__ for t in nodes] == [type(t).__name__ for t in cli]
    assert [t.weight for t in nodes] == pytest.approx([t.weight for t in cli], rel=1e-12)
    expected = DOCUMENTED[name] if mode == "raw" else (1.0, 1.0)  # auto: ratios, whatever the family
    assert [t.weight for t in nodes] == pytest.approx(expected, rel=1e-12)
    assert family.default_cross_attention_weight == pytest.approx(DOCUMENTED[name][0], rel=1e-12)
