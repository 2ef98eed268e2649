"""A native one-token decode step for AVX2 + FMA CPUs, with an AVX-512 build where the CPU has it.

Decoding one token through torch is a long chain of small ops whose dispatch overhead rivals
their work, and torch's matrix-vector products stream weights below the memory's read rate. The
step in ``kernels/decode.cpp`` runs the whole layer stack in one call over the model's own
weight tensors (no copies): embedding, RMSNorm, fused q/k/v, RoPE with the model's tables,
the KV append into zenlm's own :class:`~zenlm.model.kv_cache.KVCache`, grouped-query
attention over it (softmax in fp32), SwiGLU, residuals, the final norm and the head, with fp32,
int8 (:class:`~zenlm.infer.quantize.Int8Linear`) or int4
(:class:`~zenlm.infer.quantize.Int4Linear`'s ``blocks``) weights. Activations stay fp32
throughout, where torch's int8 and int4 kernels round them to bf16.

:func:`attach` (called by ``prepare_for_decoding``) sets ``model.decode_forward`` to a
:class:`FusedDecode`, the hook the decode loops already call for one-token steps
(``generate.token_steps``, the engine). It takes only the steps it can compute exactly as the
model would — one token per row, a cache in fp32; a batch of rows at their own lengths reads
each weight once for all of them, and rows sitting out are skipped — and hands everything else
to the model's own forward, so the torch path stays the one definition of the model and
prefill is unchanged. A row's sums run in one order alone or in any batch, on any number of
threads, so batching never changes a row's tokens.

It applies to pre-norm, causal decoders with RMSNorm, RoPE and SwiGLU (Llama, Qwen2 with its
q/k/v biases, SmolLM2) in fp32, each projection fp32, int8 or int4, after ``fuse_projections``.
Anything else (LayerNorm or GELU models, learned or sinusoidal positions, LoRA left unmerged,
int4 groups that are no multiple of 32, bf16, encoders, non-CPU devices) keeps the torch path. So does a CPU without AVX2 and
FMA, a machine where the extension cannot be built (one log line says why), and
``ZENLM_FUSED=0`` (for A/B runs).

The kernel is built once per instruction set (:func:`isa`): AVX2 + FMA, or AVX-512 with VNNI
where the CPU reports it, whose 16-float vectors double what a batch's products do per cycle
on CPUs with two 512-bit FMA units, and whose int8 products round each input row once to
int16 and sum exactly in integers (vpdpwssd: twice an fp32 FMA's products an instruction);
``ZENLM_FUSED_ISA=avx2`` keeps the AVX2 build (A/B: ``bench/fused_builds_ab.py``). Each build
computes a row one way, alone or in any batch; the two builds differ in the last bits (int8:
by the inputs' int16 rounding, about 1e-5 of a logit row).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

# the extension's switch, builds and loader live in zenlm.infer.native (quantize uses them too)
from zenlm.infer.native import (AVX512_FLAGS, CPU_FLAGS, ENV, ISA_ENV, ISAS, SOURCE, avx512_missing, build_dir,
                                cpu_supported, enabled, isa, native)

log = logging.getLogger(__name__)


def _mat(layer: nn.Module):
    """(weight, scale, bias) of a plain fp32 linear layer, an Int8Linear or an Int4Linear with
    blocks; None for others."""
    from zenlm.infer.quantize import Int4Linear, Int8Linear
    from zenlm.model.linear import is_plain_linear

    if isinstance(layer, Int8Linear):
        return layer.qweight, layer.scale, layer.bias
    if isinstance(layer, Int4Linear):
        if layer.blocks is None:
            return None
        return layer.blocks, None, None if layer.bias is None else layer.bias.float()
    if is_plain_linear(layer) and layer.weight.dtype == torch.float32:
        return layer.weight.detach(), None, None if layer.bias is None else layer.bias.detach()
    return None


def unsupported(model: nn.Module) -> str | None:
    """Why the native step cannot compute ``model`` exactly (None: it can)."""
    c = getattr(model, "config", None)
    if c is None or not hasattr(model, "blocks"):
        return "not a zenlm Transformer"
    shape = {"causal": c.causal, "norm": c.norm == "rmsnorm", "pre-norm": c.norm_position == "pre",
             "rope": c.pos == "rope", "swiglu": c.mlp == "swiglu", "no cross-attention": not c.cross_attention,
             "no MLM head": not c.mlm_head, "no embedding scale": not c.scale_embeddings,
             "no embedding norm": not c.embed_norm, "no token types": not c.type_vocab_size,
             "head_dim <= 512": c.head_dim <= 512}
    missing = [k for k, ok in shape.items() if not ok]
    if missing:
        return "needs " + ", ".join(missing)
    emb = model.tok_emb.weight
    if emb.device.type != "cpu" or emb.dtype != torch.float32:
        return "needs fp32 weights on the CPU"
    head = None if model.lm_head is None else _mat(model.lm_head)
    if model.lm_head is not None and (head is None or head[2] is not None):
        return "the output head is not a plain fp32, int8 or int4 matrix without bias"
    for i, block in enumerate(model.blocks):
        parts = {"qkv_proj": block.attn._modules.get("qkv_proj"), "o_proj": block.attn.o_proj,
                 "gate_up_proj": block.mlp._modules.get("gate_up_proj"), "down_proj": block.mlp.down_proj}
        for name, layer in parts.items():
            if layer is None:
                return f"blocks.{i}: projections not fused (fuse_projections)"
            if _mat(layer) is None:
                return f"blocks.{i}.{name} is a {type(layer).__name__}, not fp32, int8 or int4 rows"
        for norm in (block.attn_norm, block.mlp_norm):
            if norm.weight is None or norm.weight.dtype != torch.float32:
                return f"blocks.{i}: norms need fp32 weights"
    return None


def _eps(norm: nn.Module) -> float:
    return norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps


def build(model: nn.Module, module=None):
    """The native decoder over ``model``'s current weights (pointers, not copies)."""
    module = module or native()
    c = model.config
    if model.lm_head is None:
        head, head_scale = model.tok_emb.weight.detach(), None
    else:
        head, head_scale, _ = _mat(model.lm_head)
    eps = {_eps(n) for b in model.blocks for n in (b.attn_norm, b.mlp_norm)} | {_eps(model.norm)}
    if len(eps) != 1:
        raise ValueError("the native step takes one norm eps for every norm")
    dec = module.Decoder(model.tok_emb.weight.detach(), model.norm.weight.detach(), head, head_scale,
                         model.rope_cos, model.rope_sin, c.n_head, c.n_kv_head, c.head_dim, c.d_ff,
                         eps.pop())
    for block in model.blocks:
        a, m = block.attn, block.mlp
        dec.add_layer(block.attn_norm.weight.detach(), *_mat(a.qkv_proj), *_mat(a.o_proj),
                      block.mlp_norm.weight.detach(), *_mat(m.gate_up_proj), *_mat(m.down_proj))
    return dec


KV_DTYPES = (torch.float32, torch.float16)  # the caches the step reads and writes


class FusedDecode:
    """``model(idx, cache=..., last_only=...)`` for decode loops, natively where it can be.

    A one-token step (B, 1) over an fp32 cache of B rows (per-row lengths or one shared length)
    runs in the native decoder, which reads each weight once for all rows; rows sitting out
    (``live``) are skipped, their cache and length untouched and their logits zero; built on first use from the model's weights as they are then
    (prepare the model fully first); any other call goes to the model itself. Not a module, so
    the model's state dict and parameters do not change; a deep copy rebuilds its own.
    """

    def __init__(self, model: nn.Module, module):
        self.model, self.module, self.decoder = model, module, None

    def __deepcopy__(self, memo):
        model = memo.get(id(self.model), self.model)
        return FusedDecode(model, self.module)

    def __getstate__(self):
        return {"model": self.model, "module": None, "decoder": None}

    def native_step(self, idx: torch.Tensor, cache) -> bool:
        # (a per-row view from ``KVCache.rows`` carries only layers, lengths and live)
        return (cache is not None and self.module is not None and idx.dim() == 2 and idx.shape[1] == 1
                and idx.shape[0] == cache.batch and not getattr(cache, "cross", None)
                and cache.layers[0][0].dtype in KV_DTYPES)

    def __call__(self, idx: torch.Tensor, targets=None, *, cache=None, last_only: bool = False, **kwargs):
        if targets is not None or kwargs or not self.native_step(idx, cache):
            return self.model(idx, targets, cache=cache, last_only=last_only, **kwargs)
        per_row = cache.lengths is not None
        b = idx.shape[0]
        rows = [i for i, ok in enumerate(cache.live) if ok] if per_row and cache.live is not None else list(range(b))
        if not rows:
            return torch.zeros(b, 1, self.model.config.vocab_size)
        positions = [cache.lengths[i] for i in rows] if per_row else [cache.pos] * b
        tokens = idx[:, 0].tolist()
        logits = self._step([tokens[i] for i in rows], positions, rows, cache)
        if per_row:
            lengths = list(cache.lengths)
            for i, p in zip(rows, positions):
                lengths[i] = p + 1
            cache.lengths = lengths
        else:
            cache.pos += 1
        if len(rows) < b:  # rows sitting out get no logits (the caller reads the live ones)
            full = logits.new_zeros(b, 1, logits.shape[-1])
            full[rows] = logits
            logits = full
        return logits

    def _step(self, tokens: list[int], positions: list[int], slots: list[int], cache,
              logit_rows: list[int] | None = None) -> torch.Tensor:
        """The native step over ``cache``'s tensors, after the checks that name what is wrong."""
        end = max(positions) + 1
        if end > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; asked for {end}")
        if end > self.model.config.max_seq_len:
            raise ValueError(f"sequence of {end} tokens exceeds the context of {self.model.config.max_seq_len}")
        if self.decoder is None:
            self.decoder = build(self.model, self.module)
        # (logit_rows only where given: a kernel from before it, built by bench/fused_builds_ab.py
        # --against, still takes one-token steps)
        return self.decoder.step(tokens, positions, slots, [k for k, _ in cache.layers],
                                 [v for _, v in cache.layers], *([logit_rows] if logit_rows else []))

    def argmax(self, logits: torch.Tensor) -> list[int]:
        """Each row's greedy pick, as ``logits.argmax(-1)`` (the first of equals, NaN largest),
        on the calling thread: torch's reduction there took a tenth of an int8 step."""
        return self.module.argmax_rows(logits.float().contiguous())

    def can_run(self, cache) -> bool:
        """Whether :meth:`rows` can compute over ``cache`` (a full per-row fp32 or fp16 cache)."""
        return (self.module is not None and cache is not None and cache.lengths is not None
                and not getattr(cache, "cross", None) and cache.layers[0][0].dtype in KV_DTYPES)

    def rows(self, entries: list[tuple[int, list[int]]], cache) -> torch.Tensor:
        """Several cache rows' next tokens in one native step, each entry ``(cache row, tokens)``
        at that row's length: one token for a decoding row, a prompt chunk for a prefilling one
        (its positions are computed causally, exactly as one token a step would be). Every
        weight is read once for all of them, so a joining prompt rides along with the running
        streams' step instead of stalling them. Logits of each entry's last token (len, V); the
        rows' lengths advance."""
        if not self.can_run(cache):
            raise ValueError("native rows need a per-row fp32 or fp16 KV cache and the built extension")
        tokens, positions, slots, last = [], [], [], []
        seen = set()
        for slot, ids in entries:
            if slot in seen or not ids:
                raise ValueError("each entry needs its own cache row and at least one token")
            seen.add(slot)
            start = cache.lengths[slot]
            tokens += ids
            positions += range(start, start + len(ids))
            slots += [slot] * len(ids)
            last.append(len(tokens) - 1)
        logits = self._step(tokens, positions, slots, cache, last)
        lengths = list(cache.lengths)
        for slot, ids in entries:
            lengths[slot] += len(ids)
        cache.lengths = lengths
        return logits[:, 0]


def attach(model: nn.Module) -> bool:
    """Route ``model``'s one-token decode steps through the native step where it applies
    (see the module docstring); whether it did. Never raises for an unsupported case."""
    if not enabled():
        return False
    if not cpu_supported():
        log.info("zenlm: fused decode step needs %s; decoding through torch", "+".join(CPU_FLAGS))
        return False
    why = unsupported(model)
    if why is not None:
        log.info("zenlm: fused decode step not used: %s", why)
        return False
    module = native()
    if module is None:
        return False
    model.decode_forward = FusedDecode(model, module)
    return True


def detach(model: nn.Module) -> None:
    """Back to the torch path (for A/B runs within one process)."""
    if isinstance(model.__dict__.get("decode_forward"), FusedDecode):
        del model.__dict__["decode_forward"]


__all__ = ["AVX512_FLAGS", "CPU_FLAGS", "avx512_missing", "ENV", "ISAS", "ISA_ENV", "SOURCE", "FusedDecode", "attach", "build", "build_dir",
           "cpu_supported", "detach", "enabled", "isa", "native", "unsupported"]
