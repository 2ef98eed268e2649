"""One policy for turning a loaded model into one that decodes fast: merge, fuse, cast, quantize,
compile, always in that order.

The order is the point. LoRA adapters are merged first, because the fusion and the quantizers
only touch plain linear layers: an adapter left in place would either block them or, worse, be
replaced by a quantized copy of the base weight alone, silently undoing the fine-tune. Fusing
comes next so the quantizers see one q/k/v and one gate/up matrix; the cast precedes int8 so
the parts int8 leaves in float (embeddings, norms, skipped projections) are in the chosen
dtype. The CLI (generate, chat, predict) and anything serving a model call this one function,
so they cannot drift apart.
"""

from __future__ import annotations

import torch
from torch import nn

from zenlm.errors import ConfigError

DTYPES = ("fp32", "bf16", "auto")
# none: float weights; int8: every projection and the head as int8 rows; int4: 4-bit groups of
# 32 inputs, the head int8. Both weight-only (zenlm.infer.quantize), on any CPU.
QUANTIZE = ("none", "int8", "int4")


def check_options(dtype: str, quantize: str) -> None:
    """Refuse a dtype or quantization outside the vocabulary, naming the valid ones."""
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: choose {', '.join(DTYPES)}")
    if quantize not in QUANTIZE:
        raise ConfigError(f"unknown quantization {quantize!r}: choose {', '.join(QUANTIZE)}")


def _transformer(model: nn.Module) -> nn.Module:
    """The Transformer inside ``model`` (a classifier keeps its in ``backbone``)."""
    return getattr(model, "backbone", model)


@torch.no_grad()
def prepare_for_decoding(model: nn.Module, dtype: str = "fp32", quantize: str = "none",
                         compile: bool = False, *, tokenizer=None) -> nn.Module:
    """Ready ``model`` (a Transformer, or a classifier around one) for inference, in place.

    ``dtype``: fp32 | bf16 | auto (bf16 where it is native on the model's device). ``quantize``:
    none | int8 | int4; int4 keeps its float parts in fp32 (they are small and slower in bf16
    on a CPU), so it refuses an explicit bf16. ``compile`` compiles the one-token decode step; without
    it, one-token steps of one row run in the native step of ``zenlm.infer.fused`` where the model
    and CPU allow (``ZENLM_FUSED=0`` turns it off). The model is frozen and put in eval mode: this
    is for using a model, not training it.
    """
    from zenlm.hardware import resolve_dtype
    from zenlm.model.lora import merge_lora

    check_options(dtype, quantize)
    body = _transformer(model)
    device = body.tok_emb.weight.device
    if quantize != "none" and body is not model:
        raise ConfigError(f"quantize {quantize} is for language models; a classifier runs in float")
    if quantize == "int4" and dtype == "bf16":
        raise ConfigError("int4 keeps the parts it does not quantize in fp32; drop dtype bf16")

    merge_lora(model)
    model.requires_grad_(False).eval()
    body.fuse_projections()
    if quantize != "int4" and resolve_dtype(dtype, device) == "bf16":
        model.to(torch.bfloat16)
    if quantize == "int8":
        from zenlm.infer.quantize import quantize_int8

        quantize_int8(body)
    elif quantize == "int4":
        from zenlm.infer.quantize import quantize_int4

        quantize_int4(body)
    if compile:
        from zenlm.infer.generate import compile_decoding

        compile_decoding(body)
    elif body is model:  # a language model: its batch-1 steps natively where they can be
        from zenlm.infer.fused import attach

        attach(body)
    return model


__all__ = ["DTYPES", "QUANTIZE", "check_options", "prepare_for_decoding"]
