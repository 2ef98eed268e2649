"""LoRA: a low-rank update ``x @ A.T @ B.T * alpha/r`` added to a frozen linear layer.

:class:`LoRALinear` *is* an ``nn.Linear`` that keeps the wrapped layer's own ``weight`` and
``bias`` parameters (the same tensors, not copies), so the base weights keep their names in
every state dict and the adapter adds only ``lora_A.weight`` (r, in) and ``lora_B.weight``
(out, r) next to them: exactly the keys PEFT saves for the same module, which makes adapters
portable by renaming the module path alone (see ``interop/peft.py``).

B starts at zero, so a freshly wrapped model computes what the base computed; A starts as
``nn.Linear`` initialises its weight (PEFT's default too).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from zenlm.errors import ConfigError
from zenlm.model.linear import Linear, is_plain_linear, linear
from zenlm.model.transformer import unfused_state

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# what users may write in lora.targets, and the module names each stands for
TARGET_ALIASES: dict[str, tuple[str, ...]] = {
    "q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "o": ("o_proj",),
    "gate": ("gate_proj",), "up": ("up_proj",), "down": ("down_proj",),
    "attn": ATTENTION, "attention": ATTENTION, "mlp": MLP, "all": ATTENTION + MLP,
    **{name: (name,) for name in ATTENTION + MLP},
}


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # PEFT's default; a fine-tune of under an epoch has nothing to overfit
    # module names (q_proj, ..., down_proj) or short forms: q k v o gate up down, attn, mlp, all
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o"])

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora.r must be at least 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        self.module_names()  # refuse unknown targets early

    def module_names(self) -> list[str]:
        """The targeted module names, in the model's order (q, k, v, o, gate, up, down)."""
        out: set[str] = set()
        for t in self.targets:
            if t not in TARGET_ALIASES:
                from zenlm.errors import unknown_key

                raise unknown_key("lora target", t, TARGET_ALIASES)
            out.update(TARGET_ALIASES[t])
        if not out:
            raise ConfigError("lora.targets is empty")
        return [n for n in ATTENTION + MLP if n in out]


class LoRALinear(nn.Linear):
    """``base(x) + dropout(x) @ A.T @ B.T * (alpha / r)``, with the base weight frozen."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight  # the same Parameter objects: no copy, same names
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        for attr in ("residual_init",):
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = Linear(base.in_features, r, bias=False, **kw)
        self.lora_B = Linear(r, base.out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta(self) -> torch.Tensor:
        """The update this adapter adds to the weight: ``B @ A * scaling`` (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias)
        # scale the rank-r tensor, not the (.., out) one: the same sum, r/out of the work
        return y + self.lora_B(self.lora_A(self.lora_dropout(x)) * self.scaling)

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``weight + delta`` (this module is left unchanged)."""
        out = Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device="meta")
        with torch.no_grad():
            out.weight = nn.Parameter((self.weight + self.delta()).detach().clone())
            if self.bias is not None:
                out.bias = nn.Parameter(self.bias.detach().clone())
        if hasattr(self, "residual_init"):
            out.residual_init = self.residual_init
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha:g}"


_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The block index a parameter or module name lives in (None outside the blocks)."""
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def apply_lora(model: nn.Module, cfg: LoRAConfig, *, first_layer: int = 0) -> list[str]:
    """Freeze every parameter of ``model`` and wrap the targeted linears of blocks
    ``first_layer`` and up with LoRA; returns the names of the wrapped modules.

    Only the adapters train afterwards; a task head added later brings its own trainable
    parameters.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    wanted = set(cfg.module_names())
    targets = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        layer = layer_of(name + ".")
        if (leaf in wanted and is_plain_linear(module) and layer is not None
                and layer >= first_layer):
            targets.append(name)
    if not targets:
        raise ConfigError(f"lora: no module named {', '.join(sorted(wanted))} in blocks "
                          f"{first_layer} and up")
    for name in targets:
        parent_name, leaf = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, LoRALinear(getattr(parent, leaf), cfg.r, cfg.alpha, cfg.dropout))
    return targets


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear in ``model`` by a plain linear with the update folded in."""
    for name, module in list(lora_modules(model).items()):
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, module.merged())
    return model


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every LoRA update folded into its weight and the adapter
    tensors left out (and fused projections split back): what the model computes, under the
    base model's names."""
    state = dict(model.state_dict())
    for name, module in lora_modules(model).items():
        prefix = f"{name}." if name else ""
        with torch.no_grad():
            state[f"{prefix}weight"] = (module.weight + module.delta()).detach()
        for key in [k for k in state if k.startswith(f"{prefix}lora_")]:
            del state[key]
    config = getattr(model, "config", None)
    return state if config is None else unfused_state(state, config)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (``...q_proj.lora_A.weight``, ``...lora_B.weight``)."""
    return {k: v for k, v in model.state_dict().items()
            if k.endswith((".lora_A.weight", ".lora_B.weight"))}


__all__ = ["LoRAConfig", "LoRALinear", "apply_lora", "merge_lora", "merged_state_dict",
           "adapter_state_dict", "lora_modules", "layer_of"]
