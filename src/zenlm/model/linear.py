"""The model's one matrix product, with the CPU GEMM library chosen by what this machine runs fast.

PyTorch's CPU ``F.linear`` in fp32 goes to MKL's sgemm. On AMD CPUs MKL dispatches to a generic
AVX2 path that leaves much of the core idle, while oneDNN — also shipped inside every x86
PyTorch wheel, and what ``torch.compile`` uses for CPU linears — runs code tuned for the core
it finds, on training shapes and on the large fp32 GEMV of the output head while decoding (the
rates are in the README). Both are IEEE fp32 with fp32 accumulation; only the kernels differ.

A product of a few rows (decoding: one token per sequence) is a different problem from a GEMM:
it reads each weight once and is bound by memory bandwidth, and which library streams weights
faster is not the one that multiplies faster (on an AVX2-only EPYC the two GEMMs are level
while oneDNN's GEMV reads weights markedly faster than MKL's). So the two shapes are decided
apart: :func:`cpu_backend` ``"gemm"`` and ``"gemv"``.

So :func:`linear` sends fp32 CPU products to oneDNN where a one-off timing at first use shows it
clearly faster (set ``ZENLM_MATMUL=onednn|aten`` to decide instead), and everything else — bf16
autocast, GPUs, compiled graphs, other dtypes — to ``F.linear`` unchanged. The backward pass
computes the input and weight gradients with the same kernels and skips the ones autograd does
not need (a frozen base weight under LoRA costs no weight gradient).
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError

CHOICES = ("auto", "onednn", "aten")
GEMV_MAX_ROWS = 16  # up to this many rows a product is weight-streaming (decoding), not a GEMM
_resolved: str | None = None  # cpu_backend()'s answer for GEMMs; a compiled graph reads it directly
_resolved_gemv: str | None = None


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # x @ weight.T + bias; x may have any number of leading dims, either operand any strides
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _onednn_works() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)  # never the global RNG: seeded runs stay the same
        x, w = torch.randn(3, 5, generator=g), torch.randn(4, 5, generator=g)
        return torch.allclose(_onednn(x, w, None), x @ w.T, atol=1e-5)
    except (RuntimeError, AttributeError):
        return False


def cpu_backend(kind: str = "gemm", refresh: bool = False) -> str:
    """``onednn`` or ``aten``: which library runs fp32 CPU products of ``kind`` (``gemm``, or
    ``gemv`` for at most GEMV_MAX_ROWS rows) in this process, decided once; ``refresh``
    decides again, e.g. after changing ``ZENLM_MATMUL``.

    ``auto`` times one product of that kind three times with each library, alternating, and
    takes oneDNN only when its best time is under four fifths of MKL's: a busy machine can blur
    a small difference but not the gap the choice is for, and the two are interchangeable in
    results, so a wrong call costs speed only. The GEMM is mid-sized (compute-bound, a moment
    to run); the GEMV's weight (64 MB) is larger than a CPU's last-level cache, as a model's are.
    """
    global _resolved, _resolved_gemv
    if kind == "gemv":
        if _resolved_gemv is None or refresh:
            _resolved_gemv = _choose("gemv")
        return _resolved_gemv
    if kind != "gemm":
        raise ValueError(f"kind must be gemm or gemv, got {kind!r}")
    if _resolved is None or refresh:
        _resolved = _choose("gemm")
    return _resolved


def _choose(kind: str) -> str:
    choice = os.environ.get("ZENLM_MATMUL", "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ConfigError(f"ZENLM_MATMUL={choice!r}: expected one of {', '.join(CHOICES)}")
    if choice == "aten" or not _onednn_works():
        return "aten"
    if choice == "onednn":
        return "onednn"
    if kind == "gemm":
        g = torch.Generator().manual_seed(0)  # never the global RNG: seeded runs stay the same
        x, w = torch.randn(512, 1024, generator=g), torch.randn(2048, 1024, generator=g)
    else:  # the values do not matter to the time, only the bytes: no random draws to wait for.
        # Narrow rows, as a small model's are: that is where the libraries' GEMVs differ most.
        x, w = torch.full((1, 512), 0.5), torch.full((32768, 512), 0.25)
    best = {"aten": float("inf"), "onednn": float("inf")}
    with torch.inference_mode():
        for _ in range(3):
            for name, fn in (("aten", F.linear), ("onednn", lambda a, b: _onednn(a, b, None))):
                t = time.perf_counter()
                fn(x, w)
                best[name] = min(best[name], time.perf_counter() - t)
    return "onednn" if best["onednn"] < 0.8 * best["aten"] else "aten"


@torch.library.custom_op("zenlm::onednn_linear", mutates_args=())
def _onednn_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # An op of our own, not oneDNN's: torch.compile keeps it as one opaque call instead of
    # lowering oneDNN's op (whose inductor lowering expects prepacked inference weights).
    return _onednn(x, weight, bias)


@_onednn_op.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    g = grad.reshape(-1, grad.shape[-1])
    if ctx.needs_input_grad[0]:
        grad_x = _onednn_op(grad, weight.t(), None)  # grad @ weight
    if ctx.needs_input_grad[1]:
        # (x.T @ grad).T: oneDNN copies a transposed *input*, and x is the narrower of the two
        grad_w = _onednn_op(x.reshape(-1, x.shape[-1]).t(), g.t(), None).t().contiguous()
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = g.sum(0)
    return grad_x, grad_w, grad_b


_onednn_op.register_autograd(_backward, setup_context=_setup)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, through oneDNN for fp32 on a CPU where that is the faster library.

    A compiled graph uses oneDNN only if the choice was made before compiling (any eager
    product, or :func:`cpu_backend`, makes it): timing a probe inside a trace is not possible.
    """
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or torch.is_autocast_enabled("cpu")):
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling():
        return _onednn_op(x, weight, bias) if _resolved == "onednn" else F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _onednn_op(x, weight, bias) if cpu_backend() == "onednn" else F.linear(x, weight, bias)
    # inference: the library called directly (no op-dispatch overhead per token)
    kind = "gemv" if x.numel() <= GEMV_MAX_ROWS * x.shape[-1] else "gemm"
    return _onednn(x, weight, bias) if cpu_backend(kind) == "onednn" else F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, names and init) whose product goes through :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def is_plain_linear(module: nn.Module) -> bool:
    """A dense linear layer with nothing attached (not LoRA, not quantized): safe to fuse or wrap."""
    return type(module) in (nn.Linear, Linear)


__all__ = ["Linear", "cpu_backend", "is_plain_linear", "linear"]
