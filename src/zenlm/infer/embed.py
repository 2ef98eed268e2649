"""Sentence embeddings from an encoder: batched, length-sorted, pooled and normalised.

Texts are tokenized in one call, sorted by length and cut into batches by a token budget, so
a batch holds texts of nearly one length (little padding to compute) and short texts go many
to a batch (few calls). Rows come back in the caller's order.

How a model pools is part of the model: a sentence-transformers folder says it in
``1_Pooling/config.json`` (all-MiniLM-L6-v2: the mean over real tokens, then normalised),
a plain Hugging Face encoder gets its ``[CLS]`` state, and an encoder zenlm pretrained (its
tokenizer has no ``[CLS]``) the mean. :class:`EmbedSpec` carries that choice, read by the
loader (``zenlm.interop.hf.embedding_spec``).

``dtype="int8"``: every projection of the blocks as a dynamically quantized int8 product
(:class:`DynamicInt8Linear`): the weights int8 per output row, each batch's activations
quantized on the fly, multiplied in an int8 GEMM (FBGEMM on x86). An embedding batch is many
rows, a compute-bound product, which is where int8 arithmetic pays; the weight-only kernels of
``quantize.py`` are for the memory-bound single rows of decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from zenlm.errors import ConfigError, TokenizerError

DTYPES = ("fp32", "int8")


@dataclass(frozen=True)
class EmbedSpec:
    """How a model turns hidden states into one vector: ``pooling`` mean or cls; whether the
    vector is L2-normalised by default; how many tokens a text keeps (None: the context)."""

    pooling: str = "cls"
    normalize: bool = False
    max_length: int | None = None


class DynamicInt8Linear(nn.Module):
    """A frozen linear layer as int8 weights (one scale per output row) whose inputs are
    quantized per call and multiplied in an int8 GEMM (full 8-bit activations).

    The GEMM quantizes its input with one scale for the whole batch. Where rows are far apart
    in size that gives the small ones few levels; ``per_row`` divides each row by its own
    largest value first and multiplies the product back, making the quantization per row at
    the price of two elementwise passes."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, per_row: bool = False):
        super().__init__()
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
        zero = torch.zeros(w.shape[0], dtype=torch.long)
        import warnings

        with warnings.catch_warnings():  # torch marks its quantized tensors as deprecated
            warnings.simplefilter("ignore")
            qweight = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
        b = None if bias is None else bias.detach().float().contiguous()
        self.per_row = per_row
        # per row, the bias is added after the product is scaled back
        self.packed = torch.ops.quantized.linear_prepack(qweight, None if per_row else b)
        self.register_buffer("bias", b.clone() if per_row and b is not None else None)
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        if not self.per_row:
            y = torch.ops.quantized.linear_dynamic(x2, self.packed, False)
        else:
            rows = torch.linalg.vector_norm(x2, float("inf"), dim=1, keepdim=True).clamp_(min=1e-12)
            y = torch.ops.quantized.linear_dynamic(x2 / rows, self.packed, False)
            y = y.mul_(rows) if self.bias is None else torch.addcmul(self.bias, y, rows)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


# How each projection of a block goes int8, chosen by the embeddings' cosine to fp32 on
# all-MiniLM-L6-v2 (bench/embed.py): q/k/v read a LayerNorm's rows, even enough for one scale;
# the attention output and the MLM's up projection need per-row scales; the down projection
# reads GELU outputs, whose few large channels lose the most to 8 bits, and stays fp32.
INT8_PLAN = {"qkv_proj": "tensor", "q_proj": "tensor", "k_proj": "tensor", "v_proj": "tensor",
             "o_proj": "row", "up_proj": "row", "down_proj": "float"}


def int8_available() -> bool:
    try:
        return "fbgemm" in torch.backends.quantized.supported_engines or \
            "x86" in torch.backends.quantized.supported_engines
    except AttributeError:
        return False


@torch.no_grad()
def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """The blocks' projections of a zenlm Transformer as :class:`DynamicInt8Linear` where
    INT8_PLAN says, in place (q/k/v fused first: one larger product). Embeddings,
    norms and heads stay float."""
    from zenlm.infer.quantize import replace_projections

    if not int8_available():
        raise ConfigError("int8 embeddings need torch's FBGEMM/x86 quantized engine, which this "
                          "torch build lacks: use dtype=fp32")
    model.fuse_projections()

    def make(name: str, lin: nn.Linear):
        plan = INT8_PLAN.get(name, "row")
        return None if plan == "float" else DynamicInt8Linear(lin.weight, lin.bias, per_row=plan == "row")

    replace_projections(model, make)
    return model.eval()


def batches_by_length(lengths: list[int], batch_size: int, max_tokens: int | None) -> list[list[int]]:
    """Indices sorted by length (longest first), cut into batches of at most ``batch_size``
    texts and, where ``max_tokens`` is given, at most that many padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = lengths[cur[0]] if cur else lengths[i]  # longest first: the first sets the width
        if cur and (len(cur) >= batch_size or (max_tokens and width * (len(cur) + 1) > max_tokens)):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


class Embedder:
    """A loaded encoder (model + tokenizer + :class:`EmbedSpec`) ready to embed texts."""

    def __init__(self, model: nn.Module, tokenizer, spec: EmbedSpec | None = None, *,
                 dtype: str = "fp32"):
        if dtype not in DTYPES:
            raise ConfigError(f"embedding dtype must be one of {DTYPES}, got {dtype!r}")
        if tokenizer is None:
            raise TokenizerError("this model has no tokenizer to embed text with")
        if getattr(model, "config", None) is None or not hasattr(model, "hidden_states"):
            raise ConfigError("embeddings need a zenlm Transformer (a classifier or adapter: "
                              "export it and load the backbone)")
        self.spec = spec or EmbedSpec(pooling="mean" if model.config.causal is False else "cls")
        self.model = model.eval()
        if dtype == "int8":
            self.model = quantize_dynamic_int8(self.model)
        else:
            self.model.fuse_projections()
        self.tokenizer = tokenizer
        self.dtype = dtype
        limit = model.config.max_seq_len
        self.max_length = min(self.spec.max_length or limit, limit)

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    def tokenize(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        return self.tokenizer.encode_inputs(texts, max_length=self.max_length)

    @torch.no_grad()
    def encode(self, texts: list[str], *, batch_size: int = 64, max_tokens: int | None = 8192,
               normalize: bool | None = None) -> np.ndarray:
        """(len(texts), d) float32 vectors, in the order of ``texts``."""
        from zenlm.model.heads import sentence_embedding

        if isinstance(texts, str):
            raise ConfigError("embed takes a list of texts, not one string")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        normalize = self.spec.normalize if normalize is None else normalize
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encoded = self.tokenize(list(texts))
        pad = self.tokenizer.pad_id
        device = self.model.tok_emb.weight.device
        for rows in batches_by_length([len(ids) for ids, _ in encoded], batch_size, max_tokens):
            width = len(encoded[rows[0]][0])
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            types = torch.zeros((len(rows), width), dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                tok, tt = encoded[i]
                ids[r, :len(tok)] = torch.tensor(tok)
                types[r, :len(tt)] = torch.tensor(tt)
                mask[r, :len(tok)] = 1
            ids, types, mask = ids.to(device), types.to(device), mask.to(device)
            full = bool(mask.all())  # every row this long: no mask, the plain kernel
            hidden = self.model.hidden_states(ids, attention_mask=None if full else mask,
                                              token_type_ids=types)
            vec = sentence_embedding(hidden, mask, self.spec.pooling, normalize)
            out[rows] = vec.float().cpu().numpy()
        return out


__all__ = ["Embedder", "EmbedSpec", "DynamicInt8Linear", "quantize_dynamic_int8",
           "batches_by_length", "DTYPES"]
