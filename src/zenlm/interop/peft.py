"""LoRA adapters in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT names an adapter tensor by the Hugging Face module path under ``base_model.model.``:
``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``. zenlm's LoRA modules keep
the base module's name and add ``lora_A``/``lora_B`` exactly as PEFT does, so the tensor names
are the family's usual zenlm -> Hugging Face renaming with that prefix. A classification head
travels as a module PEFT saves whole (``modules_to_save``: ``score``), as PEFT does for
``SEQ_CLS`` adapters. The result loads with ``PeftModel.from_pretrained`` onto the model
:func:`zenlm.export_hf` writes for the base.
"""

from __future__ import annotations

import os
from pathlib import Path

from zenlm.errors import UnsupportedArchitectureError

PREFIX = "base_model.model."


def adapter_tensors(model) -> tuple[dict, dict]:
    """(PEFT config fields, PEFT-named tensors) of a model carrying zenlm LoRA adapters."""
    from zenlm.interop.registry import hf_family_for
    from zenlm.model.lora import adapter_state_dict, layer_of, lora_modules

    classifier = model if hasattr(model, "backbone") else None
    backbone = model.backbone if classifier is not None else model
    cfg = backbone.config
    family = hf_family_for(cfg)
    if family.name != "llama":
        raise UnsupportedArchitectureError(
            f"PEFT adapters are written for Llama-family models; {family.name} fuses q/k/v into "
            f"one matrix (export the merged model instead)")
    modules = lora_modules(backbone)
    if not modules:
        raise UnsupportedArchitectureError("this model has no LoRA adapters")
    ranks = {m.r for m in modules.values()}
    alphas = {m.alpha for m in modules.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise UnsupportedArchitectureError("adapters of different ranks or alphas in one model")
    state = adapter_state_dict(backbone)
    tensors = {PREFIX + k: v for k, v in family.weights_to_hf(state, cfg).items()}
    layers = sorted({layer_of(n + ".") for n in modules})
    fields = {
        "r": ranks.pop(), "lora_alpha": alphas.pop(),
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in modules}),
        "layers_to_transform": None if layers == list(range(cfg.n_layer)) else layers,
        "task_type": "CAUSAL_LM", "modules_to_save": None,
    }
    if classifier is not None:
        tensors[PREFIX + "score.weight"] = classifier.head.score.weight
        fields.update(task_type="SEQ_CLS", modules_to_save=["score"])
    return fields, {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def save_adapter(model, out_dir: str | os.PathLike, *, base: str | None = None, lora=None) -> Path:
    """Write the adapters of ``model`` (and its classification head) as a PEFT adapter folder."""
    from safetensors.torch import save

    from zenlm.io import atomic_write_bytes, atomic_write_json

    fields, tensors = adapter_tensors(model)
    config = {
        "peft_type": "LORA", "base_model_name_or_path": base, "revision": None,
        "inference_mode": True, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "lora_dropout": float(lora.dropout) if lora is not None else 0.0,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "use_rslora": False, "use_dora": False, **fields,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "adapter_model.safetensors", save(tensors, metadata={"format": "pt"}))
    atomic_write_json(out / "adapter_config.json", config)
    return out


__all__ = ["save_adapter", "adapter_tensors"]
