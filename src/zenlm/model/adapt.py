"""Turn a base model into what a fine-tune trains: a head, LoRA adapters, frozen parts.

The same function builds the model when training starts and when a finished run is loaded
(``interop/load.py``), so a checkpoint that holds only the trained tensors always finds the
same module tree to go into.
"""

from __future__ import annotations

from torch import nn

from zenlm.errors import ConfigError
from zenlm.model.lora import LoRAConfig, apply_lora


def adapt(backbone: nn.Module, *, task: str, labels: list[str] | None = None,
          pooling: str = "auto", method: str = "lora", lora: LoRAConfig | None = None,
          freeze_embeddings: bool = False, freeze_layers: int = 0) -> nn.Module:
    """``backbone`` (a Transformer) ready for ``task`` (``classify`` or ``chat``).

    ``method="lora"``: the base is frozen and LoRA adapters are added to the targeted linears
    of blocks ``freeze_layers`` and up; ``"full"``: every parameter trains except the
    embeddings (with ``freeze_embeddings``; a tied LM head is the same tensor) and blocks below
    ``freeze_layers``. A classification head always trains.
    """
    n_layer = backbone.config.n_layer
    if not 0 <= freeze_layers <= n_layer:
        raise ConfigError(f"finetune.freeze_layers must be between 0 and {n_layer} (the model's "
                          f"layers), got {freeze_layers}")
    if method == "lora":
        if freeze_layers == n_layer:
            raise ConfigError("finetune.freeze_layers freezes every layer: LoRA has nowhere to go")
        apply_lora(backbone, lora or LoRAConfig(), first_layer=freeze_layers)
    elif method == "full":
        for p in backbone.parameters():
            p.requires_grad_(True)
        if freeze_embeddings:
            for name in ("tok_emb", "pos_emb"):
                emb = getattr(backbone, name, None)
                if emb is not None:
                    emb.requires_grad_(False)
        for block in list(backbone.blocks)[:freeze_layers]:
            block.requires_grad_(False)
    else:
        raise ConfigError(f"finetune.method must be lora or full, got {method!r}")
    if task == "classify":
        from zenlm.model.heads import Classifier

        if not labels:
            raise ConfigError("a classifier needs its labels")
        return Classifier(backbone, labels, pooling)
    if task == "chat":
        return backbone
    raise ConfigError(f"task must be classify or chat, got {task!r}")


__all__ = ["adapt"]
