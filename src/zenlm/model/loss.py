"""The language-model loss from hidden states (:func:`lm_loss`), and the output head and
cross-entropy in one pass over row chunks (:func:`head_cross_entropy`): the (tokens, vocab)
logits never exist in full.

A language model's loss is the largest tensor of a training step: for SmolLM2 (vocab 49,152) a
batch of 16 x 512 tokens has 1.6 GB of fp32 logits, and as much again for their gradient, and
the softmax and its backward stream that memory several times at DRAM speed. Computed a few
hundred rows at a time, each chunk's logits stay in cache: the forward pass also works out the
chunk's gradient (softmax minus one-hot, a closed form) and immediately turns it into the input
and weight gradients, which backward then only scales. Same products, same fp32 softmax (also
under bf16 autocast, like ``F.cross_entropy``), a fraction of the memory traffic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zenlm.model.linear import linear

# Rows per chunk: at least MIN_ROWS (with fewer the products lose more than the cache gains:
# a few dozen rows ran slower than the plain loss, several hundred faster, in the bench of
# train_step.py), more while a chunk's logits stay under CHUNK_ELEMENTS. The logits held at once: 512 x vocab, not batch x seq x vocab.
CHUNK_ELEMENTS = 1 << 22
MIN_ROWS = 512


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                reduction: str) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid = targets != -100
        count = valid.sum()
        # mean: each token's loss (and gradient) counts 1/count; a batch of padding gives 0, not NaN
        scale = 1.0 / count.clamp(min=1) if reduction == "mean" else torch.ones((), device=h.device)
        rows = max(MIN_ROWS, CHUNK_ELEMENTS // weight.shape[0])
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        for start in range(0, h.shape[0], rows):
            hc, tc, vc = h[start:start + rows], targets[start:start + rows], valid[start:start + rows]
            raw = linear(hc, weight)  # bf16 under autocast, as the plain head would be
            logits = raw.float()
            lse = torch.logsumexp(logits, dim=-1)
            tgt = tc.clamp(min=0).unsqueeze(1)
            total += ((lse - logits.gather(1, tgt).squeeze(1)) * vc).sum()
            if not (need_h or need_w):
                continue
            probs = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in the logits' memory
            probs.scatter_add_(1, tgt, -vc.to(probs.dtype).unsqueeze(1))  # - one-hot (real targets)
            # padding rows get no gradient; the products run in the forward product's dtype
            grad = probs.mul_((vc * scale).unsqueeze(1)).to(raw.dtype)
            if need_h:
                grad_h[start:start + rows] = linear(grad, weight.t())  # grad @ weight
            if need_w:
                grad_w += linear(hc.t(), grad.t()).t()  # (hc.T @ grad).T: the narrow one transposed
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


def head_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy(h @ weight.T, targets, ignore_index=-100, reduction=reduction)`` for
    ``h`` (N, d) and ``targets`` (N,), without holding the (N, V) logits; ``mean`` or ``sum``."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"head_cross_entropy: reduction {reduction!r} (mean or sum)")
    return _HeadCrossEntropy.apply(h, weight, targets, reduction)


def lm_loss(model, h: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``model``'s next-token predictions from hidden states ``h`` (..., d)
    against ``targets`` (...); targets equal to -100 carry no loss (prompt masking, padding).
    ``mean``, ``sum``, or ``none`` (a loss per target, in its shape).

    ``model`` gives ``logits(h)`` and ``head_weight()`` (a plain head matrix or None), as
    :class:`~zenlm.model.Transformer` does. Where the loss is computed, and how, is decided here
    and only here:

    * on a CPU in eager mode, positions without a target (a chat prompt, padding) are dropped
      before the head: with a vocabulary of 49k the head is a fifth of a small model's work.
      Not on a GPU, where the data-dependent shape costs a host sync per step, nor in a compiled
      graph, which it would break;
    * a plain head matrix goes through :func:`head_cross_entropy` (a fraction of the memory);
    * compiled graphs (which fuse the plain loss themselves), ``reduction="none"``, and heads
      that are not one plain matrix (quantized) take ``F.cross_entropy`` of ``model.logits``.
    """
    eager = not torch.compiler.is_compiling()
    if reduction != "none" and eager:
        if h.device.type == "cpu":
            keep = targets != -100
            if not bool(keep.all()):
                h, targets = h[keep], targets[keep]
        weight = model.head_weight()
        if weight is not None:
            return head_cross_entropy(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), reduction)
    logits = model.logits(h)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100, reduction=reduction)
    return loss.view(targets.shape) if reduction == "none" else loss
