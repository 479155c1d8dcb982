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

Models of other sources (:mod:`autoprune.sources`) name layers by module
(``layer1.0.conv1``) and channel groups by their root layer
(:mod:`autoprune.graph`); their plans carry ``layers`` (the names valid for
that model: :func:`plan_for` fills it in), may use Torch-Pruning's criteria
and ``round_to`` (kept widths a multiple of 4, 8 or 16).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .channel import check_round_to
from .errors import AutopruneError
from .kinds import KINDS, Pruned, get_kind
from .model import CONV_NAMES, PRUNABLE_LAYERS, VGG
from .sources import prunable

CHANNEL_LAYERS = CONV_NAMES[:-1]


def layers_for(kind: str) -> tuple[str, ...]:
    """The layer names a plan of this kind may set on the lab's VGG."""
    check_kind(kind)
    return PRUNABLE_LAYERS if not KINDS[kind].changes_shape else CHANNEL_LAYERS


def check_kind(kind: str) -> None:
    get_kind(kind)


@dataclass(frozen=True)
class PruningPlan:
    """Layer -> fraction removed, for one pruning kind (see the module doc)."""

    kind: str
    ratios: dict = field(default_factory=dict)
    criterion: str = ""
    base_channels: tuple | None = None
    round_to: int = 1  # channel: kept widths a multiple of this (never 0, never above the dense width)
    layers: tuple | None = None  # the names this plan may set; None: the lab's VGG names

    def __post_init__(self):
        check_kind(self.kind)
        valid = layers_for(self.kind) if self.layers is None else tuple(self.layers)
        object.__setattr__(self, "layers", None if self.layers is None else valid)
        criteria = KINDS[self.kind].criteria(lab_vgg=self.layers is None)
        check_round_to(self.round_to)
        if self.round_to > 1 and not KINDS[self.kind].changes_shape:
            raise AutopruneError(f"round_to applies to channel plans, not {self.kind}; leave it 1")
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
        if self.round_to != 1:
            d["round_to"] = self.round_to
        if self.layers is not None:
            d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PruningPlan":
        layers = d.get("layers")
        return cls(d["kind"], dict(d.get("ratios") or {}), d.get("criterion", ""), d.get("base_channels"),
                   d.get("round_to", 1), None if layers is None else tuple(layers))

    def for_model(self, model: VGG) -> "PruningPlan":
        """This plan, recording ``model``'s conv widths as its base."""
        return PruningPlan(self.kind, self.ratios, self.criterion, tuple(model.channels), self.round_to, self.layers)


def plan_for(model, kind: str, ratios: dict[str, float], criterion: str = "", round_to: int = 1) -> PruningPlan:
    """A plan for ``model`` of any source, its names checked against the model's layers or groups."""
    check_kind(kind)
    if isinstance(model, VGG):
        return PruningPlan(kind, ratios, criterion, round_to=round_to).for_model(model)
    return PruningPlan(kind, ratios, criterion, round_to=round_to, layers=KINDS[kind].layers(prunable(model)))


def parse_ratio_spec(spec: str, kind: str, layers=None) -> dict[str, float]:
    """``"0.3"`` (every layer of the kind, or of ``layers``) or ``"conv0=0.1,conv5=0.6"`` -> ratios."""
    spec = spec.strip()
    try:
        if "=" not in spec:
            return {name: float(spec) for name in (layers_for(kind) if layers is None else layers)}
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


def prune(model: VGG, plan: PruningPlan) -> Pruned:
    """Apply ``plan`` to a copy of ``model``; ``model`` itself is never modified."""
    if plan.base_channels is not None and tuple(model.channels) != tuple(plan.base_channels):
        raise AutopruneError(
            f"the plan was made for a VGG with conv widths {list(plan.base_channels)}, this model has "
            f"{list(model.channels)}; make the plan for this width"
        )
    return KINDS[plan.kind].apply(model, prunable(model), plan.ratios, plan.criterion, plan.round_to)
