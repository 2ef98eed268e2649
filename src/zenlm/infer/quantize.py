"""Int8 weights and activations for CPU decoding: a quarter of the bytes to stream per token.

Decoding one token reads every weight once, so on a CPU it is bound by memory bandwidth, not
arithmetic. Storing weights as int8 (one scale per output row) cuts those bytes by 4. Each
input row is quantized to int8 on the fly (one scale per row), and the product goes through
``torch._int_mm`` (oneDNN's int8 GEMM, which has AVX2 kernels), then is rescaled to float.
``torch.ops.aten._weight_int8pack_mm`` (int8 weights, float activations) would avoid
quantizing activations, but on AVX2-only CPUs it runs a scalar loop ~40x slower than fp32.

The cost is measured, not assumed (bench/infer_smollm2.py; perplexity on the first 20,000
characters of GPL-3 through the int8 path, SmolLM2-135M, fp32 25.181): everything int8 costs
+4.7%; keeping ``down_proj`` in float (its input, the SwiGLU product, carries the outlier
channels per-row int8 handles worst) +2.2%; also keeping q/k/v in float +1.4%, the default.
Embedding lookups stay in float (a gather reads one row, not the table); a tied output head
gets its own int8 copy. Prefill (many rows) dequantizes to the float GEMM, so it is exact up
to the weight rounding.
"""

from __future__ import annotations

import torch
from torch import nn


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: w ≈ q * scale[:, None]."""
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.float()


FLOAT_BY_DEFAULT = ("down_proj", "q_proj", "k_proj", "v_proj")
INT8_MAX_ROWS = 32  # above this many rows (prefill), dequantize and use the float GEMM


class Int8Linear(nn.Module):
    """A frozen ``nn.Linear`` stored as int8 rows; computes with int8 x int8 -> int32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        q, scale = quantize_rows(weight.detach().float())
        self.register_buffer("weight_t", q.t())  # (in, out): the layout _int_mm reads as its B
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        if x2.shape[0] > INT8_MAX_ROWS:
            # Prefill: many rows make the float GEMM compute-bound and far faster than this
            # CPU's int8 path, so dequantize the weight once for the whole chunk.
            y = torch.mm(x2, self.weight_t.float() * self.scale)
        else:
            xs = torch.linalg.vector_norm(x2, ord=float("inf"), dim=1, keepdim=True).clamp_(min=1e-12) / 127.0
            xq = torch.round(x2 / xs).to(torch.int8)
            y = torch._int_mm(xq, self.weight_t).float().mul_(xs).mul_(self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


@torch.no_grad()
def quantize_int8(model: nn.Module, skip: tuple[str, ...] = FLOAT_BY_DEFAULT) -> nn.Module:
    """Replace the linear layers of a zenlm Transformer (and its output head) in place.

    ``skip`` names projections to keep in float (see the module docstring).
    """
    for block in model.blocks:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and name not in skip:
                    setattr(parent, name, Int8Linear.from_linear(child))
    head = model.lm_head if model.lm_head is not None else None
    model.lm_head = Int8Linear(model.tok_emb.weight if head is None else head.weight, None)
    model.quantized = "int8"
    return model.eval()
