"""DP-SGD on the one loop (privacy/dp.py): per-sample gradients of zenlm's layers against
one-example batches, the privacy ledger against Opacus's accountants, the delta rules, the budget
stop, and the LoRA weight delta of a DP step against what clipped per-example gradients predict
(the failure of Opacus issue #820: LoRA updates silently wrong under Opacus + PEFT).
"""

from __future__ import annotations

import copy
import json
import math
from unittest import mock

import pytest
import torch
from torch import nn

import zenlm
from zenlm.config import TransformerConfig, family_switches
from zenlm.errors import ConfigError
from zenlm.model import Transformer
from zenlm.model.lora import LoRAConfig, LoRALinear, apply_lora
from zenlm.privacy.config import DPConfig
from zenlm.privacy.dp import (PrivateTraining, epsilon_for, hookable_head, noise_for,
                              poisson_sample)
from zenlm.privacy.grad_samplers import register, slow_path_modules
from zenlm.train.distributed import World
from zenlm.train.finetune import ClassifyTask, finetune, resolve_finetune

from test_finetune import quiet, toy_rows, write_tsv


def tiny(family: str, tie: bool) -> Transformer:
    cfg = TransformerConfig(**{**family_switches(family), "vocab_size": 61, "n_layer": 2, "n_head": 2,
                               "n_kv_head": 2 if family == "gpt2" else 1, "d_model": 16,
                               "max_seq_len": 16, "tie_embeddings": tie})
    return Transformer(cfg)


def example_losses(model, x, y):
    """What ChatTask.example_losses computes: each row's mean loss over its targets."""
    losses = model(x, y, reduction="none")
    return losses.sum(1) / (y != -100).sum(1).clamp(min=1)


def rows(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, masked in ((11, 3), (7, 2), (5, 0)):
        ids = torch.randint(1, 61, (n + 1,), generator=g)
        y = ids[1:].clone()
        y[:masked] = -100  # a prompt: no loss on it (masked targets)
        out.append((ids[:-1], y))
    return out


def padded(examples):
    width = max(len(x) for x, _ in examples)
    x = torch.zeros(len(examples), width, dtype=torch.int64)
    y = torch.full((len(examples), width), -100, dtype=torch.int64)
    for i, (xi, yi) in enumerate(examples):
        x[i, :len(xi)], y[i, :len(yi)] = xi, yi
    return x, y


def no_functorch(*a, **k):
    raise AssertionError("the functorch fallback computed a per-sample gradient")


@pytest.mark.parametrize("family,tie,method", [("llama", False, "full"), ("gpt2", True, "full"),
                                               ("llama", True, "lora")])
def test_per_sample_gradients_equal_one_example_batches(family, tie, method):
    torch.manual_seed(0)
    model = tiny(family, tie).train()
    if method == "lora":
        apply_lora(model, LoRAConfig(r=4, targets=["all"]))
        lora = model.blocks[1].attn.q_proj
        lora.weight.requires_grad_(True)  # a trained base weight: LoRALinear's own sampler
        model.norm.weight.requires_grad_(True)
    examples = rows()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expected = []
    for xi, yi in examples:  # the reference: each example alone, plain autograd
        model.zero_grad(set_to_none=True)
        example_losses(model, xi[None], yi[None]).sum().backward()
        expected.append({n: p.grad.clone() for n, p in params.items()})
    model.zero_grad(set_to_none=True)

    from opacus.grad_sample import GradSampleModule

    register()
    undo = hookable_head(model)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
    assert slow_path_modules(gsm) == []
    hooked = {type(m).__name__ for m in gsm.iterate_submodules(model)}
    want = {"Linear", "Embedding", "RMSNorm" if family == "llama" else "LayerNorm"}
    if method == "lora":
        want = {"Linear", "LoRALinear", "RMSNorm"}
    assert want <= hooked
    x, y = padded(examples)
    with mock.patch("opacus.grad_sample.grad_sample_module.ft_compute_per_sample_gradient", no_functorch):
        example_losses(gsm, x, y).sum().backward()
    for n, p in params.items():
        assert p.grad_sample is not None, n
        for i in range(len(examples)):
            torch.testing.assert_close(p.grad_sample[i], expected[i][n], atol=1e-6, rtol=0, msg=n)
    gsm._close()
    undo()
    assert model.lm_head is None or not tie  # the tied layout is back


def test_accountants_rdp_and_prv():
    """zenlm's ledger is Opacus's accountant; PRV is the tighter one and the two stay close."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    sigma, q, steps, delta = 1.0, 0.01, 2000, 1e-5
    for kind, cls in (("rdp", RDPAccountant), ("prv", PRVAccountant)):
        acc = cls()
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
        assert epsilon_for(kind, sigma, q, steps, delta) == pytest.approx(acc.get_epsilon(delta=delta), rel=1e-9)
    rdp, prv = (epsilon_for(k, sigma, q, steps, delta) for k in ("rdp", "prv"))
    # PRV is the tighter bound; RDP's conversion to (eps, delta) costs 8-20% of eps in the regimes
    # fine-tuning runs in (the issue asked for 5%: Opacus's accountants do not agree that closely)
    assert prv <= rdp <= 1.15 * prv
    # noise calibrated to a target spends it, by either accountant
    for kind in ("rdp", "prv"):
        s = noise_for(kind, 3.0, delta, q, steps)
        assert 2.95 <= epsilon_for(kind, s, q, steps, delta) <= 3.0


def test_delta_rules():
    cfg = DPConfig(epsilon=8)
    assert cfg.resolve_delta(1000) == pytest.approx(1000 ** -1.1)
    assert DPConfig(epsilon=8, delta="1e-4").resolve_delta(1000) == 1e-4
    for bad in ("1e-3", "0.01", "0"):
        with pytest.raises(ConfigError, match="below 1/N"):
            DPConfig(epsilon=8, delta=bad).resolve_delta(1000)
    with pytest.raises(ConfigError, match="delta"):
        DPConfig(epsilon=8, delta="often")


def test_poisson_sampling_rate():
    g = torch.Generator().manual_seed(0)
    sizes = [len(poisson_sample(1000, 0.05, g)) for _ in range(400)]
    mean = sum(sizes) / len(sizes)
    assert abs(mean - 50) < 2.0  # binomial(1000, 0.05): mean 50, sd of the mean ~0.35
    assert len(set(sizes)) > 10  # the batch size itself is random


def dp_cfg(tmp_path, base, train_file, **train):
    raw = {"task": "classify", "base": str(base),
           "data": {"train": str(train_file), "text_col": "sentence"},
           "lora": {"r": 4, "targets": ["all"]},
           "train": {"out_dir": str(tmp_path / "run"), "batch_size": 8, "grad_accum": 2, "lr": 1e-2,
                     "progress": False, "device": "cpu", "log_every": 1, "seed": 3,
                     "dp": {"epsilon": 8, "accountant": "rdp"}, **train}}
    return resolve_finetune(raw)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_tsv(tmp_path_factory.mktemp("dp") / "train.tsv", toy_rows(300))


def test_dp_run_reports_opacus_epsilon_and_stops_at_budget(tmp_path, trained_run, toy):
    # noise planned for 4 steps, 9 asked for: the run stops when a 5th would overspend
    cfg = dp_cfg(tmp_path, trained_run, toy, max_steps=9, eval_every=2, ckpt_every=0,
                 dp={"epsilon": 8, "accountant": "rdp", "steps": 4})
    lines = []
    summary = finetune(cfg, zenlm.load(str(trained_run)), log=lines.append)
    pr = summary["privacy"]
    n = summary["n_train"]
    assert pr["n_examples"] == n and pr["delta"] == pytest.approx(n ** -1.1)
    assert pr["sample_rate"] == pytest.approx(16 / n)
    assert pr["steps"] == pr["steps_allowed"] == summary["step"] < 9
    assert pr["budget_exhausted"] and any("privacy budget reached" in s for s in lines)
    # the epsilon reported is Opacus's accountant for the same rate, noise and steps
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for _ in range(pr["steps"]):
        acc.step(noise_multiplier=pr["noise_multiplier"], sample_rate=pr["sample_rate"])
    assert pr["epsilon"] == pytest.approx(acc.get_epsilon(delta=pr["delta"]), rel=1e-9)
    assert pr["epsilon"] <= 8.0
    evals = [r for r in map(json.loads, (tmp_path / "run/metrics.jsonl").read_text().splitlines())
             if "val_accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4] and evals[0]["epsilon"] < evals[1]["epsilon"] == pr["epsilon"]
    assert all(0.0 <= r["clipped"] <= 1.0 and r["grad_norm_median"] > 0 for r in evals)
    on_disk = json.loads((tmp_path / "run/summary.json").read_text())
    assert on_disk["privacy"]["epsilon"] == pr["epsilon"]
    from zenlm.privacy.card import read_card

    card = read_card(tmp_path / "run")["privacy"]  # the lineage card carries the same ledger
    assert card["dp"] is True and card["epsilon"] == pr["epsilon"] and card["delta"] == pr["delta"]
    from zenlm.checkpoint import latest_checkpoint, load_checkpoint

    ckpt = latest_checkpoint(tmp_path / "run")
    _, state, _ = load_checkpoint(ckpt)
    assert state["step"] == pr["steps"] and state["dp"]["steps"] == pr["steps"]
    # resuming does not buy more budget: the ledger comes back and the run stops at once
    again = finetune(dp_cfg(tmp_path, trained_run, toy, max_steps=9, eval_every=2, ckpt_every=0,
                            dp={"epsilon": 8, "accountant": "rdp", "steps": 4}),
                     zenlm.load(str(trained_run)), resume=True, log=quiet)
    assert again["step"] == pr["steps"] and again["privacy"]["epsilon"] == pr["epsilon"]


def test_dp_needs_planned_steps_and_one_process(tmp_path, trained_run, toy):
    cfg = dp_cfg(tmp_path, trained_run, toy, max_steps=None, max_minutes=1.0)
    cfg.finetune.epochs = None
    with pytest.raises(ConfigError, match="steps planned"):
        finetune(cfg, zenlm.load(str(trained_run)), log=quiet)
    cfg = dp_cfg(tmp_path, trained_run, toy, max_steps=2, dp={"epsilon": 8, "delta": "0.01"})
    with pytest.raises(ConfigError, match="below 1/N"):
        finetune(cfg, zenlm.load(str(trained_run)), log=quiet)


def test_lora_weight_delta_after_one_dp_step(trained_run, toy, tmp_path):
    """Opacus #820 guard: with zero noise and an active clip, one DP step moves exactly the
    adapters and the head, by minus lr times the mean of the clipped per-example gradients."""
    cfg = dp_cfg(tmp_path, trained_run, toy, max_steps=1, batch_size=4, grad_accum=3)
    task = ClassifyTask(cfg, zenlm.load(str(trained_run)), log=quiet)
    model = task.build(World())
    model.train()
    reference = copy.deepcopy(model)
    trained = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or n.startswith("head.") for n in trained)
    engine = PrivateTraining(cfg.train.dp, model, task, cfg.train, World(), log=quiet)
    engine.sigma, engine.clip = 0.0, 0.05  # no noise; a clip small enough to bind
    gen = torch.Generator().manual_seed(11)
    idx = poisson_sample(engine.n, engine.rate, torch.Generator().manual_seed(11)).tolist()
    assert len(idx) > 4  # more than one micro-batch
    want = {n: torch.zeros_like(p) for n, p in trained.items()}
    clipped, norms = 0, []
    for i in idx:  # each example alone, plain autograd, clipped by hand
        reference.zero_grad(set_to_none=True)
        task.example_losses(reference, task.dp_batch([i])).sum().backward()
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in trained.values()))
        factor = min(1.0, engine.clip / (float(norm) + 1e-6))
        clipped += factor < 1.0
        norms.append(float(norm))
        for n, p in trained.items():
            want[n] += factor * p.grad
    assert clipped > 0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    engine.step(gen, torch.autocast("cpu", enabled=False), "cpu")
    opt.step()
    stats = engine.clipping()  # what the eval line reports: these examples' norms
    assert stats["clipped"] == pytest.approx(clipped / len(idx))
    assert stats["grad_norm_median"] == pytest.approx(float(torch.tensor(norms).median()), rel=1e-4)
    assert engine.clipping() == {}  # each report covers the steps since the last
    engine.close()
    for n, p in model.named_parameters():
        delta = p.detach() - before[n]
        if n in trained:
            torch.testing.assert_close(delta, -0.5 * want[n] / engine.expected_batch, atol=1e-7, rtol=1e-4)
        else:
            assert torch.equal(delta, torch.zeros_like(delta)), n  # the frozen base is untouched
    assert any(float(d.abs().max()) > 0 for n, d in want.items() if "lora_B" in n)


def test_cli_flags_fill_the_dp_config_and_refuse_a_large_delta(tmp_path, trained_run, toy, capsys):
    from zenlm.cli.main import main

    argv = ["finetune", "classify", "--model", str(trained_run), "--train", str(toy),
            "--text-col", "sentence", "--out", str(tmp_path / "run"), "--max-steps", "2",
            "--dp-epsilon", "8", "--dp-delta", "0.05", "--dp-max-grad-norm", "0.5",
            "--dp-accountant", "rdp"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "train.dp.delta=0.05 must be above 0 and below 1/N" in err and "\n" == err[-1] and err.count("\n") == 1
