"""DP-SGD on the one training loop: Poisson-sampled logical batches, per-example clipping,
Gaussian noise once per logical batch, and the privacy spent, through Opacus.

What Opacus gives here is the part that is easy to get subtly wrong and is worth a peer's
review: per-sample gradients (``GradSampleModule`` hooks, with zenlm's layers registered in
:mod:`zenlm.privacy.grad_samplers` so none takes the slow functorch fallback) and the privacy
accountants (RDP, PRV) with ``get_noise_multiplier``. The step itself is small and kept here,
because the loop owns the optimizer, the LR schedule and the data position:

1. every example joins the logical batch independently with probability q = B / N (Poisson
   sampling, which the accountants' amplification-by-sampling bound assumes);
2. the sample is cut into physical micro-batches of ``train.batch_size`` rows (memory), each one
   forward and backward with a *sum* of per-example losses, so each example's gradient is its
   own; every example's gradient (over all trained tensors together) is clipped to
   ``max_grad_norm`` and added to a running sum;
3. once per logical batch, N(0, (sigma * C)^2) noise is added to the sum, which is divided by
   the *expected* batch size B (not the drawn one: its size is private too), and becomes
   ``p.grad`` for the loop's optimizer.

Packed rows would mix several examples in one gradient, so a DP step draws one example per row
from the task (``dp_batch``), whatever ``data.pack`` says. The loss takes the plain path: one
loss per example (``Task.example_losses``), through a head that is a module Opacus can hook.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings

import torch
from torch import nn

from zenlm.errors import ConfigError
from zenlm.privacy.config import DPConfig


@contextlib.contextmanager
def _quiet_opacus():
    """Silence two warnings every DP run would print and no user can act on: the PRV
    accountant's RDP-based domain bound reaching its largest order (the bound only sizes PRV's
    grid), and torch's note that a full backward hook fires on module outputs when the inputs
    (frozen embeddings under LoRA) need no gradient, which is how Opacus's hooks are meant to
    run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


def poisson_sample(n: int, rate: float, gen: torch.Generator) -> torch.Tensor:
    """Indices of the examples drawn this step: each of ``n`` joins with probability ``rate``."""
    return torch.nonzero(torch.rand(n, generator=gen) < rate).flatten()


def make_accountant(kind: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    if kind == "rdp":
        return RDPAccountant()
    if kind == "prv":
        return PRVAccountant()
    raise ConfigError(f"train.dp.accountant must be prv or rdp, got {kind!r}")


def epsilon_for(kind: str, sigma: float, rate: float, steps: int, delta: float) -> float:
    """epsilon spent by ``steps`` Poisson-sampled Gaussian steps, by Opacus's accountant."""
    if steps == 0:
        return 0.0
    acc = make_accountant(kind)
    acc.history = [(sigma, rate, steps)]
    with _quiet_opacus():
        return float(acc.get_epsilon(delta=delta))


def noise_for(kind: str, epsilon: float, delta: float, rate: float, steps: int) -> float:
    """The noise multiplier that spends at most ``epsilon`` in ``steps`` steps."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with _quiet_opacus():
            return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta,
                                              sample_rate=rate, steps=steps, accountant=kind))
    except ValueError as exc:
        raise ConfigError(f"train.dp.epsilon={epsilon:g} cannot be reached in {steps} steps at "
                          f"sampling rate {rate:.3g}: {exc}") from None


def allowed_steps(kind: str, sigma: float, rate: float, delta: float, epsilon: float, start: int) -> int:
    """The most steps whose epsilon stays within the budget (at least ``start``'s neighbourhood
    is searched: a run is planned to end near it)."""
    def fits(k: int) -> bool:
        return epsilon_for(kind, sigma, rate, k, delta) <= epsilon

    lo = start if fits(start) else 0
    if lo == 0:  # the plan itself does not fit (it should): search below it
        hi = start
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo
    hi = lo + max(1, lo // 64)
    while fits(hi):
        lo, hi = hi, hi + (hi - lo) * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


@contextlib.contextmanager
def _nothing():
    yield


def hookable_head(model: nn.Module):
    """Give a tied, trained output head a module of its own for Opacus to hook.

    A tied head multiplies by ``tok_emb.weight`` without a module, so Opacus would see only the
    embedding's share of that tensor's per-example gradient. A ``Linear`` sharing the very
    Parameter, set as ``lm_head``, makes ``Transformer.logits`` go through a module; Opacus adds
    up the two shares of the shared tensor. Returns a function that undoes it (the run's files
    keep the tied layout: the extra name is a duplicate of a parameter and never saved).
    """
    from zenlm.model.linear import Linear

    backbone = getattr(model, "backbone", model)
    emb = getattr(backbone, "tok_emb", None)
    if (emb is None or not hasattr(backbone, "lm_head") or backbone.lm_head is not None
            or not emb.weight.requires_grad or getattr(model, "backbone", None) is not None):
        return lambda: None  # untied, frozen, or a classifier (which never uses the LM head)
    with torch.device("meta"):
        head = Linear(emb.embedding_dim, emb.num_embeddings, bias=False)
    head.weight = emb.weight
    backbone.lm_head = head

    def undo() -> None:
        backbone.lm_head = None

    return undo


class PrivateTraining:
    """DP-SGD for one run: wraps the model for per-sample gradients, makes each logical step,
    and keeps the privacy ledger. The loop calls :meth:`step`, :meth:`exhausted`,
    :meth:`epsilon`, :meth:`summary` and :meth:`close`."""

    def __init__(self, cfg: DPConfig, model: nn.Module, task, tc, world, log=print):
        from opacus.grad_sample import GradSampleModule

        from zenlm.privacy.grad_samplers import register, slow_path_modules

        if world.distributed:
            raise ConfigError("differential privacy runs in one process: torchrun is not supported with train.dp")
        if tc.compile:
            raise ConfigError("train.compile does not work with train.dp (Opacus hooks need eager modules)")
        if tc.activation_checkpointing:
            raise ConfigError("train.activation_checkpointing does not work with train.dp "
                              "(recomputed forwards would record activations twice)")
        if not hasattr(task, "dp_batch"):
            raise ConfigError(f"the {task.name} task does not support differential privacy")
        self.cfg, self.task, self.tc, self.log = cfg, task, tc, log
        self.n = task.dp_examples()
        self.delta = cfg.resolve_delta(self.n)
        self.expected_batch = tc.batch_size * tc.grad_accum
        if self.expected_batch >= self.n:
            raise ConfigError(f"the logical batch (batch_size x grad_accum = {self.expected_batch}) "
                              f"must be smaller than the {self.n} training examples")
        self.rate = self.expected_batch / self.n
        self.planned = cfg.steps or tc.max_steps
        if not self.planned:
            raise ConfigError("differential privacy needs the number of steps planned in advance "
                              "(noise is calibrated to it): set --epochs, --max-steps or train.dp.steps")
        self.sigma = noise_for(cfg.accountant, cfg.epsilon, self.delta, self.rate, self.planned)
        self.allowed = allowed_steps(cfg.accountant, self.sigma, self.rate, self.delta, cfg.epsilon,
                                     self.planned)
        self.steps = 0
        self.clip = cfg.max_grad_norm
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._undo_head = hookable_head(model)
        register()
        self.module = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
        slow = slow_path_modules(self.module)
        if slow:
            self.close()
            raise ConfigError(f"no fast per-sample gradient for {', '.join(slow[:3])}: register a "
                              f"grad sampler for it (zenlm.privacy.grad_samplers)")
        self.noise_gen = torch.Generator(device=self.params[0].device)
        self.noise_gen.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        self._epsilon_cache: tuple[int, float] | None = None
        self._norms: list[torch.Tensor] = []  # per-example gradient norms since the last report

    def describe(self) -> str:
        return (f"differential privacy: epsilon {self.cfg.epsilon:g}, delta {self.delta:.3g} "
                f"({self.cfg.accountant}); {self.n:,} examples drawn with probability "
                f"{self.rate:.4g} (expected batch {self.expected_batch}), clip {self.clip:g}, "
                f"noise multiplier {self.sigma:.4f} for {self.planned} steps")

    # -- the step -------------------------------------------------------------------------------
    def step(self, gen: torch.Generator, autocast, device: str) -> tuple[torch.Tensor, int]:
        """One logical DP-SGD batch: leaves the noised, clipped mean gradient in ``p.grad``;
        returns the mean example loss and the tokens seen."""
        task = self.task
        idx = poisson_sample(self.n, self.rate, gen).tolist()
        lengths = task.dp_lengths()
        idx.sort(key=lambda i: lengths[i])  # similar lengths share a micro-batch: less padding
        total = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        loss_sum = torch.zeros((), device=device)
        tokens = 0
        for start in range(0, len(idx), self.tc.batch_size):
            batch = task.to_device(task.dp_batch(idx[start:start + self.tc.batch_size]), device)
            tokens += task.batch_tokens(batch)
            with autocast:
                losses = task.example_losses(self.module, batch)
            with _quiet_opacus():
                losses.sum().backward()
            loss_sum += losses.detach().float().sum()
            self._clip_into(total, len(losses))
        for p, acc in zip(self.params, total):
            noise = torch.normal(0.0, self.sigma * self.clip, size=acc.shape, device=acc.device,
                                 generator=self.noise_gen)
            p.grad = ((acc + noise) / self.expected_batch).to(p.dtype)
        self.steps += 1
        self._epsilon_cache = None
        return loss_sum / max(len(idx), 1), tokens

    def _clip_into(self, total: list[torch.Tensor], batch: int) -> None:
        """Clip each example's gradient (all trained tensors together) and add it to ``total``."""
        samples = []
        for p in self.params:
            gs = getattr(p, "grad_sample", None)
            if isinstance(gs, list):  # more than one forward per backward: not a DP step's shape
                raise RuntimeError("per-sample gradients were accumulated over several passes")
            samples.append(gs)
            p.grad_sample = None
            p.grad = None  # the summed gradient autograd also made is not used
        norms = torch.zeros(batch, device=total[0].device)
        for g in samples:
            if g is not None:
                norms += g[:batch].reshape(batch, -1).float().pow(2).sum(1)
        norms = norms.sqrt()
        self._norms.append(norms.detach().cpu())
        factor = (self.clip / (norms + 1e-6)).clamp(max=1.0)
        for acc, g in zip(total, samples):
            if g is not None:
                acc += torch.einsum("i,i...->...", factor, g[:batch].float())

    def clipping(self) -> dict:
        """How the clip norm sat against the examples' gradients since the last call: the
        share clipped and the median norm. All clipped with a median far above the clip norm
        means the clip sets every example's weight (a smaller clip changes little); few clipped
        means the noise, scaled to the clip norm, is large against most gradients.

        A diagnostic for whoever runs the training, who sees the data anyway: both figures come
        from the raw per-example norms, no noise, so epsilon does not cover them. They go into
        the run's log and ``metrics.jsonl`` only, never into the model, its card or an export."""
        if not self._norms:
            return {}
        norms, self._norms = torch.cat(self._norms), []
        return {"clipped": float((norms > self.clip).float().mean()),
                "grad_norm_median": float(norms.median())}

    # -- the ledger -----------------------------------------------------------------------------
    def epsilon(self, steps: int | None = None) -> float:
        """epsilon spent after ``steps`` (default: the steps taken), by the run's accountant."""
        k = self.steps if steps is None else steps
        if self._epsilon_cache is not None and self._epsilon_cache[0] == k:
            return self._epsilon_cache[1]
        eps = epsilon_for(self.cfg.accountant, self.sigma, self.rate, k, self.delta)
        self._epsilon_cache = (k, eps)
        return eps

    def exhausted(self) -> bool:
        """True when one more step would spend more than the budget."""
        return self.steps >= self.allowed

    def summary(self) -> dict:
        """The privacy record of the run: what summary.json, the report and the lineage card
        carry (the card's epsilon field reads ``epsilon`` from here)."""
        return {"dp": True, "mechanism": "DP-SGD (Poisson sampling, per-example clipping, Gaussian noise)",
                "accountant": self.cfg.accountant, "epsilon": self.epsilon(),
                "epsilon_target": self.cfg.epsilon, "delta": self.delta,
                "delta_rule": "1/N^1.1" if str(self.cfg.delta).lower() == "auto" else "given",
                "n_examples": self.n, "sample_rate": self.rate,
                "expected_batch": self.expected_batch, "noise_multiplier": self.sigma,
                "max_grad_norm": self.clip, "steps": self.steps, "steps_planned": self.planned,
                "steps_allowed": self.allowed, "budget_exhausted": self.exhausted()}

    def state_dict(self) -> dict:
        return {"steps": self.steps, "sigma": self.sigma, "rate": self.rate, "delta": self.delta,
                "planned": self.planned, "allowed": self.allowed,
                "noise_rng": self.noise_gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Resume the ledger: the noise of the original plan, and the steps already spent."""
        if not state:
            return
        self.steps, self.sigma, self.rate = int(state["steps"]), float(state["sigma"]), float(state["rate"])
        self.delta, self.planned, self.allowed = float(state["delta"]), int(state["planned"]), int(state["allowed"])
        self.noise_gen.set_state(state["noise_rng"])
        self._epsilon_cache = None

    def close(self) -> None:
        """Remove the hooks and the hookable head: the model is a plain zenlm model again."""
        self.module._close()
        self._undo_head()


def private_training(model: nn.Module, task, tc, world, log=print) -> PrivateTraining | None:
    """The DP engine for a run whose ``train.dp.epsilon`` is set, else None."""
    cfg = getattr(tc, "dp", None)
    if cfg is None or not cfg.enabled:
        return None
    return PrivateTraining(cfg, model, task, tc, world, log)


__all__ = ["PrivateTraining", "private_training", "poisson_sample", "noise_for", "epsilon_for",
           "allowed_steps", "make_accountant", "hookable_head"]
