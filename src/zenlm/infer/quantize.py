"""Int8 and int4 weights for CPU decoding: fewer bytes per token.

Decoding one token reads every weight once, so on a CPU it is bound by memory bandwidth, not
arithmetic. Storing weights as int8 (one scale per output row) cuts those bytes by 4, int4 (a
scale and a zero per group of 32 inputs) by 8. Both are weight-only: each token's input stays
in float (rounded to bf16 for the kernel, which converts it back to fp32 to accumulate), so only
the weights' rounding is lost and every projection, the output head included, can go int8.
(The fused step's own int8 kernel, on CPUs with AVX-512 VNNI, rounds each input to int8 in
blocks of 64 as well, so that a batch's products are a quarter of the instructions: SmolLM2's
perplexity through it stays within 0.2% of fp32's; see ``kernels/decode.cpp``.)

int8 products of up to :data:`INT8_MAX_ROWS` rows run in the fused decode step's own kernel
(:func:`int8_kernel`) where it is built, so prompts and decoded tokens share one arithmetic;
otherwise, and for int4, in torch's own weight-only kernels (``_weight_int8pack_mm``,
``_weight_int4pack_mm_for_cpu``), which ATen dispatches to AVX2, AVX-512 or NEON code by what
the CPU reports; they read bf16 inputs but never compute a bf16 product, so unlike a bf16
matmul they are fast on CPUs without native bf16 too. (An earlier path quantized the input
rows to int8 as well and multiplied in oneDNN's int8 GEMM; on an AVX2-only EPYC its GEMV was
several times slower than these kernels and lost more accuracy, so it is gone.)

Both quantizers fuse q/k/v and gate/up first (``Transformer.fuse_projections``): decoding a
token is a chain of small ops, and fewer calls is faster. Embedding lookups stay in float (a
gather reads one row, not the table); a tied output head gets its own int8 copy. Prefill (many
rows) dequantizes int8 and int4 weights to the float GEMM, which is compute-bound there and
faster.
"""

from __future__ import annotations

import torch
from torch import nn

from zenlm.infer import native as kernels
from zenlm.model.linear import linear
from zenlm.model.projections import FUSED_PARTS


def chunked_linear(x: torch.Tensor, n: int, rows) -> torch.Tensor:
    """``x @ W.T`` (x fp32, (m, k)) where ``rows(r0, r1)`` is W's rows r0..r1 in fp32, a chunk
    of :data:`DEQUANT_CHUNK` rows at a time."""
    if n <= DEQUANT_CHUNK:
        return linear(x, rows(0, n))
    out = x.new_empty(x.shape[0], n)
    for r0 in range(0, n, DEQUANT_CHUNK):
        r1 = min(n, r0 + DEQUANT_CHUNK)
        out[:, r0:r1] = linear(x, rows(r0, r1))
    return out


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: w ≈ q * scale[:, None]."""
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.float()


INT8_MAX_ROWS = 32  # above this many rows (prefill), dequantize and use the float GEMM
# torch's weight-only int8 kernel reads past the row for input widths it does not expect and
# crashes the process (torch 2.13): on AVX2 widths that are no multiple of 8 (50, 68, 97, 100),
# on AVX-512 (Zen 5) those that are no multiple of 16 (24, 200, 264) once there are 2 or more
# rows. Such layers take the dequantized product instead; real models' widths (576, 1536, ...)
# are multiples of 16.
INT8_KERNEL_MULTIPLE = 16
# Prefill's float GEMM dequantizes this many output rows at a time (576 inputs: 590 KB, which
# stays in L2) instead of the whole matrix, which writes, faults in and re-reads 4 bytes a
# weight: on a Xeon that cost more than the product itself (SmolLM2 int8, 64 tokens: 186 ms
# whole, against 141 through the int8 kernel).
DEQUANT_CHUNK = 256
KERNEL_DTYPE = torch.bfloat16  # what the weight-only kernels read their inputs and scales in


class Int8Linear(nn.Module):
    """A frozen ``nn.Linear`` stored as int8 rows (one scale each), multiplied weight-only."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        q, scale = quantize_rows(weight.detach().float())
        self.register_buffer("qweight", q)  # (out, in)
        self.register_buffer("scale", scale)
        self.register_buffer("scale_k", scale.to(KERNEL_DTYPE))  # the kernel's copy
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        return cls(linear.weight, linear.bias)

    def dequantized(self) -> torch.Tensor:
        """The float weight this layer computes with."""
        return self.qweight.float() * self.scale.unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] > INT8_MAX_ROWS or self.in_features % INT8_KERNEL_MULTIPLE:
            # Prefill: many rows make the float GEMM compute-bound and far faster than the
            # weight-only kernel, so dequantize the weight (a chunk of rows at a time).
            y = chunked_linear(x2.float(), self.out_features,
                               lambda a, b: self.qweight[a:b].float() * self.scale[a:b, None])
        elif (native := int8_kernel()) is not None:
            y = native(x2.float().contiguous(), self.qweight, self.scale, None)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2.to(KERNEL_DTYPE), self.qweight, self.scale_k)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


def named_as(name: str, names: tuple[str, ...]) -> bool:
    """Whether projection ``name`` is, or fuses (see ``Transformer.fuse_projections``), one of ``names``."""
    return name in names or any(part in names for part in FUSED_PARTS.get(name, ()))


def replace_projections(model: nn.Module, make) -> None:
    """Swap each plain linear layer of the blocks' attention and MLP for ``make(name, linear)``
    (kept as it is where that returns None).

    A linear layer with something attached (a ``LoRALinear`` is an ``nn.Linear`` too) is
    refused: ``make`` reads only ``weight`` and ``bias``, so it would drop the adapter's update
    without a word. Merge adapters first (``zenlm.infer.prepare`` does)."""
    from zenlm.errors import ConfigError
    from zenlm.model.linear import is_plain_linear

    for i, block in enumerate(model.blocks):
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if not isinstance(child, nn.Linear):
                    continue
                if not is_plain_linear(child):
                    raise ConfigError(f"blocks.{i}.{name} is a {type(child).__name__}, not a plain "
                                      f"linear layer: merge LoRA adapters before quantizing "
                                      f"(zenlm.model.lora.merge_lora)")
                if (new := make(name, child)) is not None:
                    setattr(parent, name, new)


@torch.no_grad()
def quantize_int8(model: nn.Module, skip: tuple[str, ...] = ()) -> nn.Module:
    """Every projection of a zenlm Transformer's blocks (but those named in ``skip``) and its
    output head to :class:`Int8Linear`, in place; q/k/v and gate/up are fused first."""
    model.fuse_projections()
    replace_projections(model, lambda name, lin: None if named_as(name, skip) else Int8Linear.from_linear(lin))
    model.lm_head = Int8Linear(model.head_weight(), None)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# int4: weight-only, groupwise, bf16 activations


class Int4Linear(nn.Module):
    """A frozen ``nn.Linear`` as 4-bit weights in groups of ``group_size`` inputs, each group
    with its own scale and zero (asymmetric: w = (q - 8) * scale + zero, q in 0..15).

    The product runs in torch's packed int4 CPU kernel with bf16 inputs (weight-only, like
    :class:`Int8Linear`), streaming an eighth of fp32's bytes per token. It is GGUF's Q4_1 in another
    layout: a model loaded from a Q4_1 file (groups of 32) is re-quantized almost exactly —
    only the scales' rounding to bf16 is lost.

    It also keeps the same weights as ``blocks`` for the fused decode step
    (:mod:`zenlm.infer.fused`): torch's packed layout differs by the CPU kernel ATen picks, so
    the step cannot read it. Each row is blocks of 32 inputs, 24 bytes each (GGUF's Q4_1 with
    fp32 numbers): the scale s and the offset m as fp32, then 16 bytes whose low nibbles are
    the block's inputs 0-15 and high nibbles 16-31, for w = q * s + m, the bf16 scale and zero
    torch's kernel reads. That costs 0.75 byte a weight more memory, and decoding streams these
    3/4 byte a weight instead of int8's 1. Group sizes that are no multiple of 32 get no blocks.
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
        self.register_buffer("blocks", q4_blocks(q, self.scales_zeros.float(), group_size) if group_size % 32 == 0 else None,
                             persistent=False)
        self.group_size, self.in_features, self.out_features = group_size, k, n

    def dequantized(self) -> torch.Tensor:
        """The float weight this layer computes with (for tests and inspection)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            eye, self.packed, self.group_size, self.scales_zeros).t().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] > INT8_MAX_ROWS and self.blocks is not None:
            # Prefill: as for int8 (and at the same row count), the float GEMM over dequantized
            # weights beats the weight-only kernel when there are many rows (SmolLM2, 512
            # tokens: see the README).
            dequantize = q4_dequantizer()
            y = chunked_linear(x2.float(), self.out_features,
                               lambda a, b: dequantize(self.blocks[a:b], self.in_features))
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.to(torch.bfloat16), self.packed, self.group_size, self.scales_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


def q4_blocks(q: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """(n, k/32 * 24) uint8: ``q`` (n, k) in 0..15 with its groups' (scale, zero) pairs as
    :class:`Int4Linear` describes its ``blocks``, w = q * s + (zero - 8 s)."""
    n, k = q.shape
    s = scales_zeros[..., 0].t()  # (n, groups)
    m = scales_zeros[..., 1].t() - 8 * s
    header = torch.stack([s, m], dim=-1).repeat_interleave(group_size // 32, dim=1)  # (n, k/32, 2)
    q = q.reshape(n, k // 32, 32).to(torch.uint8)
    nibbles = q[..., :16] | (q[..., 16:] << 4)
    return torch.cat([header.float().contiguous().view(torch.uint8), nibbles], dim=-1).reshape(n, -1).contiguous()


def q4_dequantized(blocks: torch.Tensor, k: int) -> torch.Tensor:
    """The fp32 weight (n, k) that ``blocks`` hold (for tests and inspection)."""
    b = blocks.reshape(blocks.shape[0], k // 32, 24)
    header = b[..., :8].contiguous().view(torch.float32)  # (n, k/32, 2)
    q = torch.cat([b[..., 8:] & 15, b[..., 8:] >> 4], dim=-1).float()
    return (q * header[..., :1] + header[..., 1:]).reshape(b.shape[0], k)


def q4_dequantizer():
    """``(blocks, k) -> the fp32 weight blocks hold``, as the fused decode step computes it (one
    rounding of q * s + m a weight, a few ms a layer) where that extension is built, else
    through torch (:func:`q4_dequantized`: the same weights but for that one rounding). Looked
    up once a forward, not once a chunk: the lookup reads the CPU flags and the environment."""
    module = kernels.native() if kernels.enabled() and kernels.cpu_supported() else None
    return module.q4_dequantize if module is not None else q4_dequantized


def int8_kernel():
    """The fused decode step's own int8 product (``int8_linear(x, qweight, scale, bias)``) where
    that extension is built, else None (torch's weight-only kernel then). Prompt rows then go
    through the arithmetic the decoded tokens will (on AVX-512 VNNI CPUs, int16 inputs against
    int8 weights), and a 32-token chunk of SmolLM2 prefills in a fraction of torch's time."""
    module = kernels.native() if kernels.enabled() and kernels.cpu_supported() else None
    return module.int8_linear if module is not None else None


def q4_weight(blocks: torch.Tensor, k: int) -> torch.Tensor:
    """The fp32 weight ``blocks`` hold (see :func:`q4_dequantizer`)."""
    return q4_dequantizer()(blocks, k)


@torch.no_grad()
def quantize_int4(model: nn.Module, group_size: int = 32, head: str = "int8") -> nn.Module:
    """Every projection of the blocks to :class:`Int4Linear` (q/k/v and gate/up fused first),
    the output head to ``head`` (int8 | int4 | float), in place.

    Everything else (embeddings, norms, attention over the KV cache) stays in the model's float
    type: those are a few small ops per layer, and in bf16 they run slower on a CPU than in
    fp32, so only the big products read bf16. The head defaults to int8: it is a sixth of
    SmolLM2's weights but decides every token, and GGUF files often store it at 8 bits
    (SmolLM2: Q8_0); int4 there moves the next-token distribution several times more.
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
