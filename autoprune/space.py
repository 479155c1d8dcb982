"""The search space: per-layer ratios, bounded by priors, repaired onto the budget.

One float parameter per prunable layer (the fraction removed, see
:mod:`autoprune.plan`), in ``[0, upper]`` where ``upper`` comes from the
sensitivity priors (or a wide default without them). A layer whose prior
bound is 0 is not searched. A sampled point whose size (or MACs) breaks a cap
is projected onto the cap with :mod:`autoprune.budget`'s shift rule before any
fine-tuning: the sampler's proposal keeps its per-layer shape, shifted up
until the budget holds. Optuna stores the proposal as the trial's params; the
plan that actually ran is recorded beside it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import optuna

from . import budget
from .plan import PruningPlan, layers_for

log = logging.getLogger("autoprune")

# Without priors: fine-grained layers may go up to 0.99 sparsity; channel layers
# up to the ratio that keeps one channel (capped at 0.9, beyond which a VGG is gone).
NO_PRIOR_UPPER = {"fine_grained": 0.99, "channel": 0.9}


@dataclass
class SearchSpace:
    kind: str
    channels: list  # conv widths of the dense model
    upper: dict  # layer -> largest ratio searched
    max_size_fraction: float
    max_macs_fraction: float | None = None
    criterion: str = ""
    num_classes: int = 10

    @classmethod
    def build(cls, kind, channels, upper=None, *, max_size_fraction, max_macs_fraction=None,
              criterion="", num_classes=10) -> "SearchSpace":
        default = NO_PRIOR_UPPER[kind]
        if kind == "channel":
            hard = budget.channel_upper_bounds(channels)
            bounds = {n: min(default if upper is None else upper[n], hard[n]) for n in layers_for(kind)}
        else:
            bounds = {n: min(default if upper is None else upper[n], 1.0) for n in layers_for(kind)}
        return cls(kind, list(channels), bounds, max_size_fraction, max_macs_fraction, criterion, num_classes)

    def signature(self) -> str:
        """A short hash of everything that defines the space (a study keeps one space)."""
        blob = json.dumps({"kind": self.kind, "channels": self.channels,
                           "upper": {k: round(v, 6) for k, v in self.upper.items()},
                           "criterion": self.criterion}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def suggest(self, trial: optuna.Trial) -> dict[str, float]:
        """The sampler's proposal: one ratio per searched layer (others stay 0)."""
        return {n: trial.suggest_float(n, 0.0, hi) if hi > 0 else 0.0 for n, hi in self.upper.items()}

    def cost(self, ratios: dict[str, float]) -> dict[str, float]:
        """Predicted size (and MACs) fraction of dense for ``ratios``."""
        if self.kind == "fine_grained":
            return {"size": budget.fine_size_fraction(self.channels, ratios, self.num_classes)}
        return {m: budget.channel_cost_fraction(self.channels, ratios, p, self.num_classes)
                for m, p in (("size", "params"), ("macs", "macs"))}

    def repair(self, proposed: dict[str, float]) -> tuple[dict[str, float], list[str]]:
        """Project ``proposed`` onto the caps; returns the ratios to run and what was done."""
        ratios, notes = dict(proposed), []
        caps = [("size", "params", self.max_size_fraction)]
        if self.kind == "channel" and self.max_macs_fraction is not None:
            caps.append(("macs", "macs", self.max_macs_fraction))
        for name, metric, cap in caps:
            before = self.cost(ratios)[name]
            if before <= cap:
                continue
            if self.kind == "fine_grained":
                ratios = budget.fine_grained_budget(self.channels, cap, ratios, upper=self.upper,
                                                    num_classes=self.num_classes)
            else:
                ratios = budget.channel_budget(self.channels, cap, metric, ratios, upper=self.upper,
                                               num_classes=self.num_classes)
            notes.append(f"{name} {before:.4f} > cap {cap:.4f}: shifted onto the cap "
                         f"({self.cost(ratios)[name]:.4f})")
        return ratios, notes

    def plan(self, ratios: dict[str, float]) -> PruningPlan:
        return PruningPlan(self.kind, {n: r for n, r in ratios.items() if r > 0}, self.criterion,
                           tuple(self.channels))
