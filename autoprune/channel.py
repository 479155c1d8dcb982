"""Channel pruning: a physically smaller VGG, by the lab's rules.

Conv i (every conv but the last) keeps ``int(round((1 - r_i) * c_i))`` output
channels (with ``round_to`` m > 1: the nearest multiple of m, at least m, or
all ``c_i``: hardware-friendly widths); the same channels of its BatchNorm (weight, bias, running mean and
variance) and the same input channels of conv i+1 are kept with them.

Which channels, by criterion:

* ``norm`` (the lab's default): importance of channel c = Frobenius norm of
  conv i+1's ``weight[:, c]``; channels are sorted by descending importance
  (stable on ties) and the first ``keep`` kept, in that order, as the lab's
  ``apply_channel_sorting`` followed by pruning does.
* ``none``: the first ``keep`` channels, unsorted (the lab's 28.14% baseline).
* ``bn_scale``: |BatchNorm weight| (network slimming, Liu et al. 2017).
* ``l1``: L1 norm of the conv's own filter (Li et al. 2017).
"""

from __future__ import annotations

import torch

from .errors import AutopruneError
from .model import CONV_NAMES, VGG, build_model


ROUND_TO_MAX = 64


def check_round_to(round_to: int) -> int:
    if isinstance(round_to, bool) or not isinstance(round_to, int) or not 1 <= round_to <= ROUND_TO_MAX:
        raise AutopruneError(f"round_to must be an integer in [1, {ROUND_TO_MAX}] (1: the lab's rounding), "
                             f"got {round_to!r}")
    return round_to


def rounded_width(exact: float, c: int, round_to: int = 1) -> int:
    """Kept channels for ``exact`` (= (1 - r) * c): the nearest multiple of ``round_to`` in [round_to, c], or
    ``c`` itself when that is nearer (so an unpruned layer stays whole whatever its width)."""
    if round_to == 1:
        return int(round(exact))  # the lab's rounding (half to even), unchanged
    keep = min(c, max(round_to, round_to * round(exact / round_to)))
    return c if c - exact < abs(exact - keep) else keep


def kept_channels(channels: list[int], ratios: dict[str, float], round_to: int = 1) -> list[int]:
    """Channels each conv keeps under prune ratios ``ratios`` (the lab's rounding, then ``round_to``)."""
    check_round_to(round_to)
    kept = []
    for name, c in zip(CONV_NAMES, channels):
        r = float(ratios.get(name, 0.0))
        if int(round((1 - r) * c)) < 1:
            raise AutopruneError(
                f"prune ratio {r} leaves no channel of {name} ({c} channels); "
                f"use a ratio below {1 - 0.5 / c:.4f}"
            )
        kept.append(rounded_width((1 - r) * c, c, round_to))
    return kept


def channel_importance(model: VGG, i: int, criterion: str) -> torch.Tensor | None:
    """Importance of conv i's output channels; None for ``none`` (keep the first)."""
    convs = [getattr(model.backbone, n) for n in CONV_NAMES]
    if criterion == "none":
        return None
    if criterion == "norm":
        return torch.linalg.vector_norm(convs[i + 1].weight.detach(), dim=(0, 2, 3))
    if criterion == "bn_scale":
        return getattr(model.backbone, f"bn{i}").weight.detach().abs()
    if criterion == "l1":
        return convs[i].weight.detach().abs().sum(dim=(1, 2, 3))
    raise AutopruneError(f"unknown channel criterion {criterion!r}; use norm, none, bn_scale or l1")


@torch.no_grad()
def prune_channels(model: VGG, ratios: dict[str, float], criterion: str = "norm", round_to: int = 1) -> VGG:
    """A new, smaller VGG; ``model`` is not modified."""
    channels = kept_channels(list(model.channels), ratios, round_to)
    channels[-1] = model.channels[-1]  # the last conv feeds the classifier
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, keep in enumerate(channels[:-1]):
        importance = channel_importance(model, i, criterion)
        if importance is None:
            idx = torch.arange(keep)
        else:
            idx = torch.argsort(importance, descending=True, stable=True)[:keep]
        conv, bn, nxt = f"backbone.conv{i}", f"backbone.bn{i}", f"backbone.conv{i + 1}"
        state[f"{conv}.weight"] = state[f"{conv}.weight"][idx]
        for key in ("weight", "bias", "running_mean", "running_var"):
            state[f"{bn}.{key}"] = state[f"{bn}.{key}"][idx]
        state[f"{nxt}.weight"] = state[f"{nxt}.weight"][:, idx]
    small = build_model("vgg", channels=channels, num_classes=model.num_classes)
    small.load_state_dict({k: v.contiguous() for k, v in state.items()})
    small.to(next(model.parameters()).device)
    return small.train(model.training)
