"""Int8 and int4 weights for CPU decoding: fewer bytes per token.

Decoding one token reads every weight once, so on a CPU it is bound by memory bandwidth, not
arithmetic. Storing weights as int8 (one scale per output row) cuts those bytes by 4, int4 (a
scale and a zero per group of 32 inputs) by 8. How the activations meet them depends on the CPU:

* with native bf16 (AVX512-BF16/AMX, ``zenlm.hardware``), int8 weights multiply bf16 inputs
  directly (``torch.ops.aten._weight_int8pack_mm``): weight-only, so every projection goes int8
  (SmolLM2-135M from its GGUF, 2 threads: ~100 tokens/s against ~25 in fp32, perplexity
  ~+1% on GPL-3, much of it the re-rounding of the file's 4-bit groups to 8-bit rows);
* elsewhere each input row is quantized to int8 on the fly and the product goes through
  ``torch._int_mm`` (oneDNN's int8 GEMM, which has AVX2 kernels) — the bf16 kernel would run a
  scalar loop ~20x slower than fp32 there. Input rounding hurts where a few channels carry
  outliers: everything int8 costs +4.7%; keeping ``down_proj`` (its input, the SwiGLU product,
  carries the worst outliers) and q/k/v in float +1.4%, the default. With calibration text,
  :func:`smooth` first folds each input channel's outliers into the weights (SmoothQuant) and
  then every projection goes int8 (``--int8 all``) at +1.3% (GPL-3) to +2.6% (Apache-2.0).

:func:`quantize_int4` needs native bf16: 4-bit weights in groups of 32 through torch's packed
int4 kernel (GGUF's Q4_1 in another layout, so a Q4_1 model is re-held almost exactly).
Both quantizers fuse q/k/v and gate/up first (``Transformer.fuse_projections``): decoding a
token is a chain of small ops, and fewer calls is faster. The output head goes to int8 with
int8 inputs (the fastest head kernel here; +0.3% perplexity against bf16 inputs).

Embedding lookups stay in float (a gather reads one row, not the table); a tied output head
gets its own int8 copy. Prefill (many rows) dequantizes int8 to the float GEMM.
"""

from __future__ import annotations

import torch
from torch import nn

from zenlm.model.linear import linear
from zenlm.model.projections import FUSED_PARTS


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: w ≈ q * scale[:, None]."""
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.float()


FLOAT_BY_DEFAULT = ("down_proj", "q_proj", "k_proj", "v_proj")
INT8_MAX_ROWS = 32  # above this many rows (prefill), dequantize and use the float GEMM


class Int8Linear(nn.Module):
    """A frozen ``nn.Linear`` stored as int8 rows (one scale each).

    ``activations`` says how a token's input meets those weights:
    "int8" quantizes each input row to int8 too and multiplies int8 x int8 -> int32 in oneDNN
    (fast on any x86 CPU, but the input's rounding costs accuracy where a few channels carry
    outliers); "bf16" keeps the input in bf16 and multiplies by the int8 weights directly
    (weight-only: only the weights' rounding is lost), which is fast only on CPUs with native
    bf16 — elsewhere torch's kernel for it runs ~20x slower than fp32.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, activations: str = "int8"):
        super().__init__()
        if activations not in ("int8", "bf16"):
            raise ValueError(f"activations must be int8 or bf16, got {activations!r}")
        q, scale = quantize_rows(weight.detach().float())
        self.register_buffer("qweight", q)  # (out, in); _int_mm reads its transpose as B
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.activations = activations
        if activations == "bf16":
            self.register_buffer("scale_bf16", scale.to(torch.bfloat16))

    @classmethod
    def from_linear(cls, linear: nn.Linear, activations: str = "int8") -> "Int8Linear":
        return cls(linear.weight, linear.bias, activations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] > INT8_MAX_ROWS:
            # Prefill: many rows make the float GEMM compute-bound and far faster than this
            # CPU's int8 path, so dequantize the weight once for the whole chunk.
            y = linear(x2.float(), self.qweight.float() * self.scale.unsqueeze(1))
        elif self.activations == "bf16":
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight, self.scale_bf16)
        else:
            x2 = x2.float()
            xs = torch.linalg.vector_norm(x2, ord=float("inf"), dim=1, keepdim=True).clamp_(min=1e-12) / 127.0
            xq = torch.round(x2 / xs).to(torch.int8)
            y = torch._int_mm(xq, self.qweight.t()).float().mul_(xs).mul_(self.scale)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


# A few lines of mixed text for calibration when the caller gives none: the channels that
# carry outliers are a property of the model, so a short, varied sample finds them.
CALIBRATION_TEXT = """The committee met on Tuesday, 14 March, to review the budget: 3,250 euros for
equipment, 1,100 for travel and the rest for printing. "We can't afford another delay," she said.
def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
Q: What is the boiling point of water at sea level? A: 100 degrees Celsius (212 F).
Le chat dort sur le canapé. Der Zug fährt um 8:45 Uhr ab. 東京は日本の首都です。
SELECT name, COUNT(*) FROM orders WHERE total > 99.5 GROUP BY name ORDER BY 2 DESC;
Once upon a time, in a village by the sea, there lived an old fisherman and his three daughters.
"""


@torch.no_grad()
def input_absmax(model: nn.Module, ids: torch.Tensor) -> dict[nn.Linear, torch.Tensor]:
    """The largest |input| per input channel each linear layer of the blocks sees on ``ids``."""
    stats: dict[nn.Linear, torch.Tensor] = {}

    def record(module, inputs, _output):
        x = inputs[0].detach().float()
        m = x.reshape(-1, x.shape[-1]).abs().amax(0)
        stats[module] = torch.maximum(stats[module], m) if module in stats else m

    hooks = [m.register_forward_hook(record) for m in model.blocks.modules() if isinstance(m, nn.Linear)]
    try:
        model.eval()(ids)
    finally:
        for h in hooks:
            h.remove()
    return stats


def _smoothing(act: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's per-channel factor: divide the input by s and multiply weight columns by s,
    so an outlier channel's range is shared between activation and weight (alpha: how much)."""
    w = torch.cat([w.detach().float() for w in weights]).abs().amax(0)
    return (act.clamp(min=1e-5) ** alpha / w.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def smooth(model: nn.Module, ids: torch.Tensor, alpha: float = 0.6) -> nn.Module:
    """Move activation outliers into the weights without changing the float model's function.

    Per-row int8 activations lose precision when a few channels are far larger than the rest;
    here each such channel is divided by a factor before quantization and the factor is
    folded into what produces it: the norm's weight for q/k/v and gate/up, and up_proj's rows
    for down_proj (SwiGLU: down's input is silu(gate) * up, linear in up). The float model
    computes the same function up to rounding; its int8 version loses much less.
    """
    stats = input_absmax(model, ids[:, :model.config.max_seq_len])
    for block in model.blocks:
        a, m = block.attn, block.mlp
        # fused (Transformer.fuse_projections) or not: up's rows come last in what computes it
        mlp_in = m.gate_up.layers(m) if m.kind == "swiglu" else [m.up_proj]
        up = mlp_in[-1]
        groups = [(block.attn_norm, a.qkv.layers(a)), (block.mlp_norm, mlp_in)]
        for norm, lins in groups:
            if norm.weight is None:
                continue
            s = _smoothing(stats[lins[0]], [lin.weight for lin in lins], alpha)
            norm.weight.div_(s.to(norm.weight.dtype))
            if getattr(norm, "bias", None) is not None:
                norm.bias.div_(s.to(norm.bias.dtype))
            for lin in lins:
                lin.weight.mul_(s.to(lin.weight.dtype))
        if m.kind == "swiglu":
            s = _smoothing(stats[m.down_proj], [m.down_proj.weight], alpha)
            rows = slice(up.out_features - s.numel(), None)  # up's rows (all of them unless fused)
            up.weight[rows].div_(s[:, None].to(up.weight.dtype))
            if up.bias is not None:
                up.bias[rows].div_(s.to(up.bias.dtype))
            m.down_proj.weight.mul_(s.to(m.down_proj.weight.dtype))
    return model


def named_as(name: str, names: tuple[str, ...]) -> bool:
    """Whether projection ``name`` is, or fuses (see ``Transformer.fuse_projections``), one of ``names``."""
    return name in names or any(part in names for part in FUSED_PARTS.get(name, ()))


def replace_projections(model: nn.Module, make) -> None:
    """Swap each ``nn.Linear`` of the blocks' attention and MLP for ``make(name, linear)``
    (kept as it is where that returns None)."""
    for block in model.blocks:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and (new := make(name, child)) is not None:
                    setattr(parent, name, new)


@torch.no_grad()
def quantize_int8(model: nn.Module, skip: tuple[str, ...] | None = None,
                  calibration: torch.Tensor | None = None, alpha: float = 0.6,
                  activations: str = "auto") -> nn.Module:
    """Replace the linear layers of a zenlm Transformer (and its output head) in place.

    ``activations`` (see :class:`Int8Linear`): "auto" is "bf16" (weight-only) where the CPU
    has native bf16, else "int8". Weight-only int8 loses little, so every projection goes to
    int8. With int8 activations, ``calibration`` token ids (B, T) first smooth outliers into
    the weights (:func:`smooth`) and then every projection becomes int8; without, ``skip``
    names projections kept in float (default: those whose inputs carry the worst outliers,
    see the module docstring). q/k/v and gate/up are fused first (fewer products per token).
    """
    if activations == "auto":
        from zenlm.hardware import native_bf16

        activations = "bf16" if native_bf16(model.tok_emb.weight.device) else "int8"
    if activations == "int8" and calibration is not None:
        smooth(model, calibration, alpha)
    if skip is None:
        skip = FLOAT_BY_DEFAULT if activations == "int8" and calibration is None else ()
    model.fuse_projections()
    replace_projections(model, lambda name, lin: None if named_as(name, skip)
                        else Int8Linear.from_linear(lin, activations))
    model.lm_head = Int8Linear(model.head_weight(), None)
    return model.eval()


def calibration_ids(tokenizer, text: str = CALIBRATION_TEXT) -> torch.Tensor:
    """Token ids (1, T) of ``text`` for :func:`quantize_int8`."""
    return torch.tensor([tokenizer.encode_prompt(text)])


# ----------------------------------------------------------------------------------------------
# int4: weight-only, groupwise, bf16 activations


class Int4Linear(nn.Module):
    """A frozen ``nn.Linear`` as 4-bit weights in groups of ``group_size`` inputs, each group
    with its own scale and zero (asymmetric: w = (q - 8) * scale + zero, q in 0..15).

    The product runs in torch's packed int4 CPU kernel with bf16 activations, which on CPUs
    with native bf16 streams an eighth of fp32's bytes per token. It is GGUF's Q4_1 in another
    layout: a model loaded from a Q4_1 file (groups of 32) is re-quantized almost exactly —
    only the scales' rounding to bf16 is lost.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int = 32):
        super().__init__()
        n, k = weight.shape
        if k % group_size or n % 16:
            raise ValueError(f"int4 needs in_features divisible by {group_size} and out_features by 16; "
                             f"got {k} and {n}")
        w = weight.detach().float().reshape(n, k // group_size, group_size)
        lo, hi = w.amin(-1), w.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        q = torch.round((w - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.int32).reshape(n, k)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        # (groups, out, 2): scale and zero per group and output, as the kernel reads them
        sz = torch.stack([scale.t(), (lo + 8 * scale).t()], dim=-1)
        self.register_buffer("scales_zeros", sz.contiguous().to(torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16).clone())
        self.group_size, self.in_features, self.out_features = group_size, k, n

    def dequantized(self) -> torch.Tensor:
        """The float weight this layer computes with (for tests and inspection)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            eye, self.packed, self.group_size, self.scales_zeros).t().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, self.in_features).to(torch.bfloat16), self.packed, self.group_size,
            self.scales_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


@torch.no_grad()
def quantize_int4(model: nn.Module, group_size: int = 32, head: str = "int8") -> nn.Module:
    """Every projection of the blocks to :class:`Int4Linear` (q/k/v and gate/up fused first),
    the output head to ``head`` (int8 | int4 | float), in place.

    Everything else (embeddings, norms, attention over the KV cache) stays in the model's float
    type: those are a few small ops per layer, and in bf16 they run slower on a CPU than in
    fp32 (attention over 200 cached positions: ~86 against ~14 us), so only the big products
    go through bf16. The head defaults to int8: it is a sixth of SmolLM2's weights but decides
    every token, and GGUF files often store it at 8 bits (SmolLM2: Q8_0). Measured before the
    fusion (SmolLM2, KL from fp32 over 200 tokens, decode tokens/s): int8 head 0.0036, 97.5;
    bf16 head 0.0024, 85.8; int4 head 0.047, 100. CPU only; fast only where bf16 is native
    (``zenlm.hardware.native_bf16``).
    """
    if head not in ("int8", "int4", "float"):
        raise ValueError(f"head must be int8, int4 or float, got {head!r}")
    if model.tok_emb.weight.device.type != "cpu":
        raise ValueError("int4 decoding uses torch's CPU int4 kernel: move the model to the CPU")

    def fits(w: torch.Tensor) -> bool:  # the kernel's shape rules; other layers stay float
        return w.shape[1] % group_size == 0 and w.shape[0] % 16 == 0

    model.fuse_projections()
    replace_projections(model, lambda _, lin: Int4Linear(lin.weight, lin.bias, group_size)
                        if fits(lin.weight) else None)
    weight = model.head_weight()
    if head == "int8":
        model.lm_head = Int8Linear(weight, None)
    elif head == "int4" and fits(weight):
        model.lm_head = Int4Linear(weight, None, group_size)
    return model.eval()
