"""The model's linear product: oneDNN and ATen (MKL) must give the same numbers, forward and
backward, so that choosing the faster library is only a matter of speed."""

import pytest
import torch
import torch.nn.functional as F

from zenlm.config import TransformerConfig
from zenlm.errors import ConfigError
from zenlm.model import Transformer
from zenlm.model import linear as L


@pytest.fixture
def backend(monkeypatch):
    """Set ZENLM_MATMUL for one test; the process-wide choice is restored afterwards."""
    def use(name: str) -> str:
        monkeypatch.setenv("ZENLM_MATMUL", name)
        gemv = L.cpu_backend("gemv", refresh=True)
        gemm = L.cpu_backend(refresh=True)
        assert name == "auto" or gemv == gemm  # a forced library holds for both shapes
        return gemm
    monkeypatch.setattr(L, "_resolved", L._resolved)  # the process-wide choice comes back after
    monkeypatch.setattr(L, "_resolved_gemv", L._resolved_gemv)
    yield use


needs_onednn = pytest.mark.skipif(not L._onednn_works(), reason="this torch build has no oneDNN")


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_matches_aten_forward_and_backward(backend, bias):
    assert backend("onednn") == "onednn"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 37, 48, generator=g, requires_grad=True)
    w = torch.randn(80, 48, generator=g, requires_grad=True)
    b = torch.randn(80, generator=g, requires_grad=True) if bias else None
    up = torch.randn(3, 37, 80, generator=g)
    y = L.linear(x, w, b)
    assert "onednn_linear" in y.grad_fn.name()  # the path under test
    grads = torch.autograd.grad((y * up).sum(), [t for t in (x, w, b) if t is not None])
    ref = F.linear(x, w, b)
    ref_grads = torch.autograd.grad((ref * up).sum(), [t for t in (x, w, b) if t is not None])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape and got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@needs_onednn
def test_a_frozen_weight_gets_no_gradient_and_inference_needs_no_graph(backend):
    backend("onednn")
    x = torch.randn(4, 16, requires_grad=True)
    w = torch.randn(8, 16)  # frozen (a LoRA base): only the input gradient is computed
    L.linear(x, w).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(4, 16), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        assert L.linear(torch.randn(2, 16), w).grad_fn is None


def test_autocast_and_other_dtypes_keep_torchs_own_product(backend):
    backend("onednn" if L._onednn_works() else "aten")
    x, w = torch.randn(4, 16), torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert L.linear(x, w).dtype == torch.bfloat16  # autocast's cast still applies
    assert L.linear(x.double(), w.double()).dtype == torch.float64


def test_env_choice_is_checked(backend):
    assert backend("aten") == "aten"
    with pytest.raises(ConfigError, match="ZENLM_MATMUL"):
        backend("mkl")


@needs_onednn
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_training_step_gives_the_same_gradients_with_either_library(backend, family):
    cfg = TransformerConfig.preset(family, vocab_size=96, n_layer=2, n_head=4, d_model=64,
                                   max_seq_len=32)
    torch.manual_seed(0)
    model = Transformer(cfg)
    x = torch.randint(0, 96, (2, 32))
    grads = {}
    for name in ("aten", "onednn"):
        backend(name)
        model.zero_grad(set_to_none=True)
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        grads[name] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(grads["onednn"][0], grads["aten"][0], rtol=1e-5, atol=1e-6)
    for n, want in grads["aten"][1].items():
        torch.testing.assert_close(grads["onednn"][1][n], want, rtol=1e-4, atol=1e-5, msg=n)


@needs_onednn
def test_a_compiled_model_keeps_the_onednn_product_and_its_gradients(backend, monkeypatch):
    """torch.compile keeps zenlm's op as one call (oneDNN's own op has no training lowering)
    and gives the eager loss and gradients."""
    backend("onednn")
    calls = []
    real = L._onednn
    monkeypatch.setattr(L, "_onednn", lambda *a: calls.append(1) or real(*a))
    cfg = TransformerConfig.preset("gpt2", vocab_size=64, n_layer=1, n_head=2, d_model=32,
                                   max_seq_len=16)
    torch.manual_seed(0)
    model = Transformer(cfg)
    x = torch.randint(0, 64, (2, 16))
    results = []
    for fwd in (model, torch.compile(model)):
        calls.clear()
        model.zero_grad(set_to_none=True)
        loss = fwd(x[:, :-1], x[:, 1:])
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        assert len(calls) >= 3 * 5  # 5 products (4 in the block, the head), 3 each with backward
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_choosing_the_library_leaves_the_global_random_state_alone(backend):
    torch.manual_seed(123)
    backend("auto")  # runs the probe
    after_probe = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(4), after_probe)


@needs_onednn
@pytest.mark.parametrize("gemm,gemv", [("aten", "onednn"), ("onednn", "aten")])
def test_few_rows_follow_the_gemv_choice_and_many_rows_the_gemm_choice(monkeypatch, gemm, gemv):
    """Decoding (a few rows) and prefill or training (many) are decided apart: a machine whose
    GEMMs tie can still stream weights faster through one library."""
    monkeypatch.setattr(L, "_resolved", gemm)
    monkeypatch.setattr(L, "_resolved_gemv", gemv)
    calls = []
    real = L._onednn
    monkeypatch.setattr(L, "_onednn", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    w = torch.randn(24, 16)
    with torch.inference_mode():
        for rows in (1, L.GEMV_MAX_ROWS, L.GEMV_MAX_ROWS + 1, 64):
            x = torch.randn(rows, 16)
            torch.testing.assert_close(L.linear(x, w), x @ w.T, rtol=1e-5, atol=1e-5)
    want = [r for r in (1, L.GEMV_MAX_ROWS) if gemv == "onednn"] + \
           [r for r in (L.GEMV_MAX_ROWS + 1, 64) if gemm == "onednn"]
    assert calls == want


def test_the_gemv_probe_decides_by_time(monkeypatch):
    """auto takes oneDNN for GEMVs exactly when its best time beats MKL's by a fifth (the
    clock faked both ways: the choice must not depend on the machine running the test)."""
    if not L._onednn_works():
        pytest.skip("this torch build has no oneDNN")
    monkeypatch.setenv("ZENLM_MATMUL", "auto")
    monkeypatch.setattr(L, "_resolved_gemv", None)
    for onednn_time, want in ((0.5, "onednn"), (0.9, "aten")):
        # each timed call reads the clock twice: aten (0 -> 1.0), then oneDNN (0 -> onednn_time)
        ticks = iter([0.0, 1.0, 0.0, onednn_time] * 3)
        monkeypatch.setattr(L.time, "perf_counter", lambda ticks=ticks: next(ticks))
        assert L.cpu_backend("gemv", refresh=True) == want
