"""The privacy sections of a run's config: DP-SGD (``train.dp``) and planted canaries.

Plain dataclasses with no heavy imports, so ``train/config.py`` can hold them without pulling
Opacus into every run: Opacus is imported only when ``dp.epsilon`` is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from zenlm.errors import ConfigError


@dataclass
class DPConfig:
    epsilon: float | None = None  # the (epsilon, delta) budget; None: no differential privacy
    delta: str = "auto"  # auto: 1 / N^1.1 for N training examples; or a number below 1/N
    max_grad_norm: float = 1.0  # every example's gradient is clipped to this L2 norm
    accountant: Literal["prv", "rdp"] = "prv"
    # the steps the noise is calibrated for; None: train.max_steps. The run stops once one more
    # step would spend more than epsilon, whatever max_steps says.
    steps: int | None = None

    def __post_init__(self) -> None:
        if self.epsilon is not None and self.epsilon <= 0:
            raise ConfigError(f"train.dp.epsilon must be positive, got {self.epsilon}")
        if self.max_grad_norm <= 0:
            raise ConfigError(f"train.dp.max_grad_norm must be positive, got {self.max_grad_norm}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"train.dp.steps must be at least 1, got {self.steps}")
        if str(self.delta).strip().lower() != "auto":
            try:
                float(self.delta)
            except ValueError:
                raise ConfigError(f"train.dp.delta must be auto or a number, got {self.delta!r}") from None

    @property
    def enabled(self) -> bool:
        return self.epsilon is not None

    def resolve_delta(self, n: int) -> float:
        """delta for N training examples: 1/N^1.1 for auto; a delta of 1/N or more is refused,
        because a mechanism that may publish one whole example with probability 1/N is no
        protection for N examples."""
        if n < 2:
            raise ConfigError(f"differential privacy needs at least 2 training examples, got {n}")
        if str(self.delta).strip().lower() == "auto":
            return 1.0 / n ** 1.1
        delta = float(self.delta)
        if not 0 < delta < 1.0 / n:
            raise ConfigError(f"train.dp.delta={delta:g} must be above 0 and below 1/N = {1.0 / n:.3g} "
                              f"for N={n:,} training examples (auto gives 1/N^1.1 = {n ** -1.1:.3g})")
        return delta


@dataclass
class CanaryConfig:
    """Random secrets planted in the training data, to measure memorisation afterwards
    (``zenlm audit memorization``)."""

    n: int = 0  # how many distinct canaries (0: none)
    repeats: int = 10  # how often each is planted
    digits: int = 6  # the secret: this many random decimal digits
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 0 or self.repeats < 1 or not 1 <= self.digits <= 12:
            raise ConfigError("canaries: n must be >= 0, repeats >= 1, digits between 1 and 12")
