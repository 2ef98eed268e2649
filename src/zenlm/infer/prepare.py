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
# none: float weights; int8: int8 rows, skipping the outlier-prone inputs where activations
# are int8 too; int8-all: every projection, after smoothing outliers into the weights with a
# little calibration text; int4: 4-bit groups with bf16 activations (native bf16 only)
QUANTIZE = ("none", "int8", "int8-all", "int4")


def check_options(dtype: str, quantize: str) -> None:
    """Refuse a dtype or quantization outside the vocabulary, naming the valid ones."""
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: choose {', '.join(DTYPES)}")
    if quantize not in QUANTIZE:
        raise ConfigError(f"unknown quantization {quantize!r}: choose {', '.join(QUANTIZE)}")


def check_int4(device: torch.device) -> None:
    """int4's products run in bf16; where bf16 is emulated they are ~100x slower than fp32, so
    int4 is refused there rather than run. The one place this rule lives."""
    from zenlm.hardware import native_bf16

    if not native_bf16(device):
        raise ConfigError("int4 computes in bf16, which this CPU only emulates (~100x slower); "
                          "use int8 instead")


def _transformer(model: nn.Module) -> nn.Module:
    """The Transformer inside ``model`` (a classifier keeps its in ``backbone``)."""
    return getattr(model, "backbone", model)


@torch.no_grad()
def prepare_for_decoding(model: nn.Module, dtype: str = "fp32", quantize: str = "none",
                         compile: bool = False, *, tokenizer=None) -> nn.Module:
    """Ready ``model`` (a Transformer, or a classifier around one) for inference, in place.

    ``dtype``: fp32 | bf16 | auto (bf16 where it is native on the model's device). ``quantize``:
    none | int8 | int8-all | int4; int8-all calibrates on text, so it needs ``tokenizer``;
    int4 keeps its float parts in fp32 (they are small and slower in bf16 on a CPU), so it
    refuses an explicit bf16. ``compile`` compiles the one-token decode step. The model is
    frozen and put in eval mode: this is for using a model, not training it.
    """
    from zenlm.hardware import resolve_dtype
    from zenlm.model.lora import merge_lora

    check_options(dtype, quantize)
    body = _transformer(model)
    device = body.tok_emb.weight.device
    if quantize != "none" and body is not model:
        raise ConfigError(f"quantize {quantize} is for language models; a classifier runs in float")
    if quantize == "int4":
        check_int4(device)
        if dtype == "bf16":
            raise ConfigError("int4 computes its products in bf16 and keeps the rest in fp32; "
                              "drop dtype bf16")
    if quantize == "int8-all" and tokenizer is None:
        raise ConfigError("quantize int8-all calibrates on text: it needs the model's tokenizer")

    merge_lora(model)
    model.requires_grad_(False).eval()
    body.fuse_projections()
    if quantize != "int4" and resolve_dtype(dtype, device) == "bf16":
        model.to(torch.bfloat16)
    if quantize in ("int8", "int8-all"):
        from zenlm.infer.quantize import calibration_ids, quantize_int8

        quantize_int8(body, calibration=calibration_ids(tokenizer) if quantize == "int8-all" else None)
    elif quantize == "int4":
        from zenlm.infer.quantize import quantize_int4

        quantize_int4(body)
    if compile:
        from zenlm.infer.generate import compile_decoding

        compile_decoding(body)
    return model


__all__ = ["DTYPES", "QUANTIZE", "check_int4", "check_options", "prepare_for_decoding"]
