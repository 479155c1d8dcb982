"""Pruning plans: what to prune, as data; :func:`prune` applies one.

A plan maps layer names to a ratio in [0, 1] = the fraction *removed*, for
both kinds (like ``torch.nn.utils.prune``'s ``amount``):

* ``fine_grained``: per-tensor sparsity (zeros / elements) for ``conv0`` ...
  ``conv7`` and ``classifier``; applying it yields masks kept through
  fine-tuning.
* ``channel``: per-conv channel prune ratio r for ``conv0`` ... ``conv6`` (the
  last conv feeds the classifier and is never cut); ``int(round((1 - r) * c))``
  channels are kept (``round_to`` m > 1: rounded to a multiple of m, see
  :func:`autoprune.channel.kept_channels`), and applying it yields a
  physically smaller VGG.

Layers a plan does not name are left dense. ``base_channels`` records the
conv widths of the model the plan was made for, so that a plan is never
applied to a model of another width by mistake.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .channel import check_round_to, prune_channels
from .errors import AutopruneError
from .fine_grained import magnitude_masks
from .model import CONV_NAMES, PRUNABLE_LAYERS, VGG
from .train import apply_masks

KINDS = ("fine_grained", "channel")
CHANNEL_LAYERS = CONV_NAMES[:-1]
FINE_CRITERIA = ("magnitude",)
CHANNEL_CRITERIA = ("norm", "none", "bn_scale", "l1")


def layers_for(kind: str) -> tuple[str, ...]:
    """The layer names a plan of this kind may set."""
    check_kind(kind)
    return PRUNABLE_LAYERS if kind == "fine_grained" else CHANNEL_LAYERS


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise AutopruneError(f"unknown pruning kind {kind!r}; use fine_grained or channel")


@dataclass(frozen=True)
class PruningPlan:
    """Layer -> fraction removed, for one pruning kind (see the module doc)."""

    kind: str
    ratios: dict = field(default_factory=dict)
    criterion: str = ""
    base_channels: tuple | None = None
    round_to: int = 1  # channel plans: kept channels rounded to a multiple of this (1: the lab's rounding)

    def __post_init__(self):
        check_kind(self.kind)
        check_round_to(self.round_to)
        if self.round_to > 1 and self.kind != "channel":
            raise AutopruneError(f"round_to applies to channel plans, not {self.kind}; leave it 1")
        valid = layers_for(self.kind)
        criteria = FINE_CRITERIA if self.kind == "fine_grained" else CHANNEL_CRITERIA
        object.__setattr__(self, "criterion", self.criterion or criteria[0])
        if self.criterion not in criteria:
            raise AutopruneError(
                f"unknown {self.kind} criterion {self.criterion!r}; use one of {', '.join(criteria)}"
            )
        ratios = {}
        for name, value in self.ratios.items():
            if name not in valid:
                raise AutopruneError(
                    f"unknown layer {name!r} for {self.kind} pruning; valid layers: {', '.join(valid)}"
                )
            value = float(value)
            if not 0.0 <= value <= 1.0:
                raise AutopruneError(f"ratio for {name} must be in [0, 1], got {value}")
            ratios[name] = value
        object.__setattr__(self, "ratios", {k: ratios[k] for k in valid if k in ratios})
        if self.base_channels is not None:
            object.__setattr__(self, "base_channels", tuple(int(c) for c in self.base_channels))

    def ratio(self, layer: str) -> float:
        return self.ratios.get(layer, 0.0)

    def to_dict(self) -> dict:
        d = {
            "kind": self.kind,
            "ratios": dict(self.ratios),
            "criterion": self.criterion,
            "base_channels": list(self.base_channels) if self.base_channels else None,
        }
        if self.round_to > 1:  # absent at 1: plans (and the caches keyed by them) read as before
            d["round_to"] = self.round_to
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PruningPlan":
        return cls(d["kind"], dict(d.get("ratios") or {}), d.get("criterion", ""), d.get("base_channels"),
                   d.get("round_to", 1))

    def for_model(self, model: VGG) -> "PruningPlan":
        """This plan, recording ``model``'s conv widths as its base."""
        return PruningPlan(self.kind, self.ratios, self.criterion, tuple(model.channels), self.round_to)


def parse_ratio_spec(spec: str, kind: str) -> dict[str, float]:
    """``"0.3"`` (every layer of the kind) or ``"conv0=0.1,conv5=0.6"`` -> ratios."""
    spec = spec.strip()
    try:
        if "=" not in spec:
            return {name: float(spec) for name in layers_for(kind)}
        ratios = {}
        for item in spec.split(","):
            name, _, value = item.partition("=")
            ratios[name.strip()] = float(value)
        return ratios
    except ValueError:
        raise AutopruneError(
            f"cannot read ratio spec {spec!r}; use one number (e.g. 0.3) or layer=value,... "
            f"(e.g. conv0=0.1,conv5=0.6)"
        ) from None


class Pruned(NamedTuple):
    """A pruned model and, for fine-grained plans, its masks (param name -> 0/1)."""

    model: VGG
    masks: dict[str, torch.Tensor] | None


def prune(model: VGG, plan: PruningPlan) -> Pruned:
    """Apply ``plan`` to a copy of ``model``; ``model`` itself is never modified."""
    if plan.base_channels is not None and tuple(model.channels) != tuple(plan.base_channels):
        raise AutopruneError(
            f"the plan was made for a VGG with conv widths {list(plan.base_channels)}, this model has "
            f"{list(model.channels)}; make the plan for this width"
        )
    if plan.kind == "fine_grained":
        pruned = copy.deepcopy(model)
        masks = magnitude_masks(pruned, plan.ratios)
        apply_masks(pruned, masks)
        return Pruned(pruned, masks)
    return Pruned(prune_channels(model, plan.ratios, plan.criterion, plan.round_to), None)
