"""The family registry (nodes/families/): one adapter per family, recognised by ComfyUI's model config class.

- the registry lists each family exactly once, in the order the "unsupported" error names them;
- each supported tiny model is recognised by exactly one adapter, by its config class, and the adapter's capture
  code, latent format and default guided layers are what the model gets;
- a model whose tensors are a supported family's but whose config class is not one is refused (recognition is not
  by shapes), and an unsupported family's error names the supported ones;
- registering one more family module makes its models detectable and the error name it.
"""

from __future__ import annotations

import types

import comfy.latent_formats
import comfy.supported_models
import comfy.supported_models_base
import pytest
import tiny_families as tf
import tiny_families_lumina_qwen as tq
import tiny_models as tm
import torch
from conftest import REPO, pack_module

fam = pack_module("nodes.families")
adapter_mod = pack_module("nodes.families.adapter")
sd_unet = pack_module("nodes.families.sd_unet")
dit_capture = pack_module("nodes.glue.dit_capture")
joint_capture = pack_module("nodes.glue.joint_capture")
core_den = pack_module("zerocon_core.method.denoiser")
text_layout = pack_module("zerocon_core.text.text_layout")

FAMILIES = ("SD1.x", "SD2.x", "SDXL", "SD3", "Flux", "Flux.2", "Chroma", "Qwen-Image", "Z-Image")
SUPPORTED_TEXT = "SD1.x, SD2.x (eps or v-prediction), SDXL, SD3/SD3.5, Flux, Flux.2, Chroma, Qwen-Image and Z-Image"
LOAD_TEXT = (
    "Load an SD1.x, SD2.x, SDXL, SD3/SD3.5, Flux (dev or schnell), Flux.2 (dev or Klein), Chroma, Qwen-Image / Qwen-Image-Edit or Z-Image "
    "(Turbo or base) checkpoint"
)
#: builder -> (family, ComfyUI config class it is built with)
SUPPORTED_MODELS = {
    tm.sd15: ("SD1.x", comfy.supported_models.SD15),
    tm.sd2v: ("SD2.x", comfy.supported_models.SD20),
    tm.sdxl: ("SDXL", comfy.supported_models.SDXL),
    tm.sd3: ("SD3", comfy.supported_models.SD3),
    tm.flux: ("Flux", comfy.supported_models.Flux),
    tm.flux_dev: ("Flux", comfy.supported_models.Flux),
}
if tf.has_chroma():
    SUPPORTED_MODELS[tf.chroma] = ("Chroma", comfy.supported_models.Chroma)
if tq.has_qwen_image():  # ComfyUI 0.33's Qwen-Image (feature detection; refused on older ones)
    SUPPORTED_MODELS[tq.qwen_image] = ("Qwen-Image", comfy.supported_models.QwenImage)
if tq.has_z_image():  # ComfyUI 0.33's Z-Image
    SUPPORTED_MODELS[tq.z_image] = ("Z-Image", comfy.supported_models.ZImage)


class NotSD15(comfy.supported_models_base.BASE):
    """SD1.5's UNet and latent format under a config class ComfyUI does not ship (as a custom loader might)."""

    latent_format = comfy.latent_formats.SD15


class NotFlux(comfy.supported_models_base.BASE):
    """Flux's latent format under a config class ComfyUI does not ship."""

    latent_format = comfy.latent_formats.Flux


# -- the registry ------------------------------------------------------------------------------------------------


def test_each_family_is_registered_once_in_one_module():
    names = [a.name for a in fam.REGISTRY.adapters()]
    assert names == list(FAMILIES)
    modules = sorted(m.__name__.rpartition(".")[2] for m in fam.REGISTRY.modules)
    assert modules == ["chroma", "flux", "flux2", "qwen_image", "sd3", "sd_unet", "z_image"]
    assert sorted(a.name for m in fam.REGISTRY.modules for a in m.ADAPTERS) == sorted(FAMILIES)
    assert fam.SUPPORTED == SUPPORTED_TEXT
    assert {a.text_layout for a in fam.REGISTRY.adapters()} == set(text_layout.LAYOUTS)
    for name in FAMILIES:
        assert fam.adapter_named(name).name == name
    with pytest.raises(KeyError):
        fam.adapter_named("HiDream")


def test_a_family_cannot_be_registered_twice():
    with pytest.raises(ValueError, match=r"model families \['SD3'\] are registered twice"):
        fam.REGISTRY.add(pack_module("nodes.families.sd3"))
    assert [a.name for a in fam.REGISTRY.adapters()] == list(FAMILIES)


@pytest.mark.parametrize("build", list(SUPPORTED_MODELS), ids=lambda b: b.__name__)
def test_each_supported_model_is_claimed_by_exactly_one_adapter_by_its_config_class(build):
    name, config_class = SUPPORTED_MODELS[build]
    model = build()
    base = model.model
    claiming = [a for a in fam.REGISTRY.adapters() if a.claims(base)]
    assert [a.name for a in claiming] == [name]
    (adapter,) = claiming
    assert type(base.model_config) is config_class
    assert adapter_mod.comfy_class(adapter.recognition.config) is config_class
    family = fam.detect_family(model)
    assert family.name == name and family.adapter is adapter
    assert family.latent_channels == adapter.latent_channels and adapter.has_latent_format(base.latent_format)
    # the capture code the adapter names is the one that reads this network
    reader = (
        "lumina" if joint_capture.is_joint_stream(base.diffusion_model) else dit_capture.dit_type(base.diffusion_model)
    )
    assert fam.capture_code(base) == adapter.dit_type == reader
    assert fam.needs_torch_paths(base) is adapter.gradient.torch_paths is True


@pytest.mark.parametrize("build", list(SUPPORTED_MODELS), ids=lambda b: b.__name__)
def test_default_guided_layers_are_the_adapters(zc, build):
    """What the layer spec "auto" selects (zerocon_core's rule) lies in the blocks the adapter states, at most as
    many as it states."""
    model = build()
    adapter = fam.detect_family(model).adapter
    layers = zc.denoiser.ComfyDenoiser(model.model).layers()
    by_name = {info.name: info for info in layers}
    stated = adapter.guided_layers
    expected = {"cross": (stated.cross, stated.cross_count), "self": (stated.features, stated.feature_count)}
    for kind, (blocks, count) in expected.items():
        picked = [by_name[n] for n in core_den.default_layers(layers, kind)]
        assert picked and {info.block for info in picked} <= set(blocks)
        if count is None:  # a UNet: every layer of the kind in those blocks
            assert len(picked) == len([i for i in layers if i.kind == kind and i.block in blocks])
        else:
            assert len(picked) <= count


def test_adapter_settings_are_checked():
    flux = fam.adapter_named("Flux")
    assert flux.gradient.rope and flux.gradient.torch_paths
    with pytest.raises(ValueError, match="RoPE needs ComfyUI's torch paths"):
        adapter_mod.GradientPasses(torch_paths=False, rope=True)
    with pytest.raises(ValueError, match="capture must be one of"):
        _fake_adapter(capture="hooks")
    with pytest.raises(ValueError, match="text layout must be one of"):
        _fake_adapter(text_layout="Qwen")


# -- recognition is by class, not by shapes -------------------------------------------------------------------


def test_a_supported_unet_under_another_config_class_is_refused():
    model = tm._patcher(NotSD15(tm._unet_config()), seed=0)
    reference = tm.sd15(seed=0).model.diffusion_model.state_dict()
    tensors = model.model.diffusion_model.state_dict()
    assert tensors.keys() == reference.keys() and all(torch.equal(tensors[k], reference[k]) for k in tensors)
    assert type(model.model.latent_format) is comfy.latent_formats.SD15
    with pytest.raises(fam.UnsupportedModelError) as err:
        fam.detect_family(model)
    msg = str(err.value)
    assert f"ZeroCon supports {SUPPORTED_TEXT} models only; this MODEL is an unrecognised UNet (NotSD15)" in msg


def test_a_flux_network_under_another_config_class_is_refused():
    model = tm.flux()
    model.model.model_config = NotFlux(tm._flux_config(False))
    with pytest.raises(fam.UnsupportedModelError, match=r"this MODEL is a Flux network \(Flux\)"):
        fam.detect_family(model)


@pytest.mark.parametrize("kind", ["subclass of model_base.Flux", "SDXL refiner"])
def test_an_unsupported_family_error_names_the_supported_ones(kind):
    if kind == "SDXL refiner":
        model = _refiner()
        what = "an unrecognised UNet (SDXLRefiner)"
    else:
        import comfy.model_base

        model = tm.flux()
        model.model.__class__ = type("Derivative", (comfy.model_base.Flux,), {})  # Flux.2, LongCat...
        what = "a Flux network (Derivative)"
    with pytest.raises(fam.UnsupportedModelError) as err:
        fam.detect_family(model)
    msg = str(err.value)
    assert msg.startswith(f"ZeroCon supports {SUPPORTED_TEXT} models only; this MODEL is {what}. {LOAD_TEXT}")


# -- adding a family means adding one module ----------------------------------------------------------------------


def _refiner():
    cfg = tm._unet_config(adm_in_channels=2560, num_classes="sequential")
    return tm._patcher(comfy.supported_models.SDXLRefiner(cfg), seed=8)


def _detect_fake(adapter, model, base):
    ptype = fam.prediction_type(model.get_model_object("model_sampling"))
    return fam.ModelFamily(name=adapter.name, prediction_type=ptype, latent_channels=adapter.latent_channels)


def _fake_adapter(**over):
    settings = dict(
        name="SDXL Refiner",
        rank=60,
        label="SDXL Refiner",
        load_label="SDXL Refiner",
        recognition=adapter_mod.Recognition(config="comfy.supported_models.SDXLRefiner", network=sd_unet.UNET),
        latent_format="comfy.latent_formats.SDXL",
        latent_channels=4,
        native_size=1024,
        tiny_decoder="taesdxl",
        capture="unet",
        guided_layers=sd_unet.UNET_LAYERS,
        text_layout="SDXL",
        detect=_detect_fake,
    )
    return adapter_mod.FamilyAdapter(**{**settings, **over})


def test_adding_one_family_module_makes_its_models_detectable():
    module = types.ModuleType("refiner_family")
    module.ADAPTERS = (_fake_adapter(),)
    model = _refiner()
    with pytest.raises(fam.UnsupportedModelError, match="unrecognised UNet"):
        fam.detect_family(model)
    fam.REGISTRY.add(module)
    try:
        family = fam.detect_family(model)
        assert (family.name, family.prediction_type, family.native_size, family.tiny_decoder) == (
            "SDXL Refiner",
            "eps",
            1024,
            "taesdxl",
        )
        assert fam.capture_code(model.model) is None
        with pytest.raises(fam.UnsupportedModelError) as err:
            fam.detect_family(tm.flux_fill())
        assert "SDXL, SD3/SD3.5, Flux, Flux.2, Chroma, Qwen-Image, Z-Image and SDXL Refiner models only" in str(
            err.value
        )
        assert (
            "SD3/SD3.5, Flux (dev or schnell), Flux.2 (dev or Klein), Chroma, Qwen-Image / Qwen-Image-Edit, Z-Image (Turbo or base) or SDXL Refiner checkpoint"
            in str(err.value)
        )
        assert fam.detect_family(tm.sdxl()).name == "SDXL"  # the others are unchanged
    finally:
        fam.REGISTRY.remove(module)
    assert [a.name for a in fam.REGISTRY.adapters()] == list(FAMILIES)
    with pytest.raises(fam.UnsupportedModelError, match="unrecognised UNet"):
        fam.detect_family(model)


def test_the_maintainer_doc_lists_every_family():
    text = (REPO / "docs" / "families.md").read_text(encoding="utf-8")
    for adapter in fam.REGISTRY.adapters():
        module = next(m for m in fam.REGISTRY.modules if adapter in m.ADAPTERS).__name__.rpartition(".")[2]
        assert f"| {adapter.name} |" in text and f"`{module}.py`" in text
