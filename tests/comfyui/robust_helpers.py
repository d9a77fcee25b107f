"""Shared by the precision, memory-mode, LoRA and attention-kernel tests: a spy on the engine's guided loop,
a check that no weight requires grad inside the gradient passes, and the "model left as it was" check."""

from __future__ import annotations

import copy

import sampling_helpers as h
import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 distance of ``a`` from the reference ``b``."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def spy_engine(monkeypatch, zc) -> list:
    """Record every ``SampleResult`` of the engine's guided loop called by the pack's KSAMPLER function, and
    assert, at every grad-enabled UNet pass, that no weight of the autograd modules requires grad."""
    results: list = []
    real = zc.sampling.guided_ddim_sample

    def recording(denoiser, *args, **kwargs):
        result = real(denoiser, *args, **kwargs)
        results.append(result)
        return result

    monkeypatch.setattr(zc.sampling, "guided_ddim_sample", recording)
    real_predict = zc.denoiser.ComfyDenoiser.predict

    def predict(self, *args, **kwargs):
        if torch.is_grad_enabled():
            for module in self.autograd_modules:
                bad = [n for n, p in module.named_parameters() if p.requires_grad]
                assert not bad, f"weights require grad during a gradient pass: {bad[:3]}"
        return real_predict(self, *args, **kwargs)

    monkeypatch.setattr(zc.denoiser.ComfyDenoiser, "predict", predict)
    return results


def _describe(functions) -> list | None:
    """A per-layer function list as (type, name, patched key) per function: comparable across ComfyUI's reloads."""
    if functions is None:
        return None
    return [(type(f).__qualname__, getattr(f, "__qualname__", None), getattr(f, "key", None)) for f in functions]


def model_tensors(model) -> dict:
    """Every parameter and buffer of the MODEL's network, by qualified name (the tensor objects themselves)."""
    tensors = {}
    for mod_name, mod in model.model.named_modules():
        for store in (mod._parameters, mod._buffers):
            for name, t in store.items():
                if t is not None:
                    tensors[f"{mod_name}.{name}"] = t
    return tensors


def snapshot(model) -> dict:
    tensors = model_tensors(model)
    return {
        "tensors": tensors,
        "requires_grad": {name: t.requires_grad for name, t in tensors.items()},
        "options": copy.deepcopy(model.model_options),
        # comfy.ops per-layer functions (LoRA LowVramPatch...); ComfyUI rebuilds the lists on each (partial) load
        "functions": {
            name: (_describe(mod.__dict__.get("weight_function")), _describe(mod.__dict__.get("bias_function")))
            for name, mod in model.model.named_modules()
            if hasattr(mod, "comfy_cast_weights")
        },
    }


def assert_untouched(model, before: dict, stock_before: torch.Tensor, pos, neg, lat) -> None:
    """Same weight objects with the same flags, same model options, the same per-layer weight functions, and a
    stock KSampler bit-identical."""
    after = snapshot(model)
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, t in after["tensors"].items():
        assert t is before["tensors"][name], f"{name} was replaced"
        assert t.requires_grad == before["requires_grad"][name], f"{name}: requires_grad changed"
    assert after["options"] == before["options"]
    for name, functions in after["functions"].items():
        assert functions == before["functions"][name], f"{name}: per-layer functions changed"
    assert torch.equal(h.ksampler(model, pos, neg, lat), stock_before)


# -- ComfyUI's low-VRAM path, forced on a CPU ------------------------------------------------------------


def force_partial_load(monkeypatch, budget_bytes: int) -> None:
    """Make every model load go through ComfyUI's partial-load path with ``budget_bytes`` of weights resident.

    ``load_models_gpu`` passes ``lowvram_model_memory`` = the free VRAM less what the model already holds to
    ``LoadedModel.model_load`` on a GPU in normal/low-VRAM mode, and 0 (load everything) on a CPU; this hands
    it ``budget_bytes`` less what is loaded instead, so ``ModelPatcher.load`` loads the largest modules that fit regularly and marks the rest
    ``comfy_cast_weights`` (weights cast per layer by ``comfy.ops``, LoRA patches applied per layer by
    ``LowVramPatch`` weight functions). Models already loaded are unloaded first."""
    import comfy.model_management as mm

    mm.unload_all_models()
    real = mm.LoadedModel.model_load

    def model_load(self, lowvram_model_memory=0, force_patch_weights=False):
        # as load_models_gpu computes it: the memory left for weights, less what is already loaded
        extra = max(0.1, budget_bytes - self.model_loaded_memory())
        return real(self, extra, force_patch_weights=force_patch_weights)

    monkeypatch.setattr(mm.LoadedModel, "model_load", model_load)


def cast_modules(model) -> tuple[int, int]:
    """(modules ComfyUI casts per layer, modules it loaded regularly) among the UNet's comfy.ops layers."""
    cast = regular = 0
    for m in model.model.diffusion_model.modules():
        if hasattr(m, "comfy_cast_weights") and any(True for _ in m.parameters(recurse=False)):
            if m.comfy_cast_weights:
                cast += 1
            else:
                regular += 1
    return cast, regular


def lowvram_patches(model) -> int:
    """How many weights get their LoRA patch applied per layer (``LowVramPatch`` weight functions)."""
    import comfy.model_patcher

    return sum(
        isinstance(f, comfy.model_patcher.LowVramPatch)
        for m in model.model.diffusion_model.modules()
        for f in getattr(m, "weight_function", [])
    )


# -- a random LoRA in ComfyUI's key format --------------------------------------------------------------

LORA_RANK = 4
LORA_ALPHA = 2.0
#: LoRA module name -> the UNet weight it patches. Most in ComfyUI's own key format (``lora_unet_`` + the
#: weight's path with "_"), one in the diffusers UNet layout that ``comfy.lora`` maps (down_blocks.0.attentions.0
#: is input_blocks.1.1 in this 2-level UNet).
LORA_TARGETS = {
    "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_q": "input_blocks.1.1.transformer_blocks.0.attn2.to_q",
    "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k": "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
    "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v": "middle_block.1.transformer_blocks.0.attn2.to_v",
    "lora_unet_output_blocks_1_1_transformer_blocks_0_attn1_to_out_0": (
        "output_blocks.1.1.transformer_blocks.0.attn1.to_out.0"
    ),
    "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_k": "output_blocks.0.1.transformer_blocks.0.attn2.to_k",
    "lora_unet_input_blocks_1_0_in_layers_2": "input_blocks.1.0.in_layers.2",  # a 3x3 conv
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    ),
}


def random_lora(unet_state_dict: dict, seed: int = 11, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """``lora_up`` / ``lora_down`` / ``alpha`` tensors for every ``LORA_TARGETS`` entry (rank ``LORA_RANK``)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, target in LORA_TARGETS.items():
        w = unet_state_dict[target + ".weight"]
        down_shape = (LORA_RANK, *w.shape[1:])  # conv: (rank, in, kh, kw)
        up_shape = (w.shape[0], LORA_RANK) + (1,) * (w.ndim - 2)
        out[f"{name}.lora_down.weight"] = torch.randn(down_shape, generator=gen) / w[0].numel() ** 0.5
        out[f"{name}.lora_up.weight"] = scale * torch.randn(up_shape, generator=gen) / LORA_RANK**0.5
        out[f"{name}.alpha"] = torch.tensor(LORA_ALPHA)
    return out


def merge_lora(unet_state_dict: dict, lora: dict, strength: float) -> dict[str, torch.Tensor]:
    """The UNet weights with the LoRA merged in, in float64: ``W + strength * alpha / rank * up @ down``."""
    merged = {k: v.clone() for k, v in unet_state_dict.items()}
    for name, target in LORA_TARGETS.items():
        key = target + ".weight"
        up = lora[f"{name}.lora_up.weight"].double().flatten(1)
        down = lora[f"{name}.lora_down.weight"].double().flatten(1)
        scale = strength * float(lora[f"{name}.alpha"]) / up.shape[1]
        w = unet_state_dict[key]
        merged[key] = (w.double() + scale * (up @ down).reshape(w.shape)).to(w.dtype)
    return merged


def load_lora(tmp_path, model, lora: dict, strength: float):
    """``model`` with ``lora`` applied by ComfyUI's stock LoraLoader node, the file read from a temporary
    ``models/loras`` folder (ComfyUI's folder table restored afterwards)."""
    from conftest import temporary_model_folders
    from safetensors.torch import save_file

    import nodes as comfy_nodes

    with temporary_model_folders(tmp_path, ["loras"]):
        save_file({k: v.contiguous() for k, v in lora.items()}, str(tmp_path / "loras" / "tiny_lora.safetensors"))
        with torch.inference_mode():
            lora_model, clip = comfy_nodes.LoraLoader().load_lora(model, None, "tiny_lora.safetensors", strength, 0.0)
    assert clip is None
    return lora_model


def interrupt_at_step(monkeypatch, zc, stop: int = 1) -> list:
    """Press Cancel at step ``stop``: the pack's progress callback sets ComfyUI's interrupt flag there (the sampler
    honours it before the next step). Returns the steps the callback saw."""
    import comfy.model_management

    steps_seen = []
    real = zc.sampling.progress.node_callback

    def interrupting(model, steps, x0_output=None):
        cb = real(model, steps, x0_output)

        def callback(step, x0, x, total):
            steps_seen.append(step)
            if step == stop:
                comfy.model_management.interrupt_current_processing(True)
            return cb(step, x0, x, total)

        return callback

    monkeypatch.setattr(zc.sampling.progress, "node_callback", interrupting)
    return steps_seen
