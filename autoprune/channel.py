"""Channel pruning: a physically smaller VGG, by the lab's rules.

Conv i (every conv but the last) keeps ``int(round((1 - r_i) * c_i))`` output
channels; the same channels of its BatchNorm (weight, bias, running mean and
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


def kept_channels(channels: list[int], ratios: dict[str, float]) -> list[int]:
    """Channels each conv keeps under prune ratios ``ratios`` (the lab's rounding)."""
    kept = []
    for name, c in zip(CONV_NAMES, channels):
        r = float(ratios.get(name, 0.0))
        keep = int(round((1 - r) * c))
        if keep < 1:
            raise AutopruneError(
                f"prune ratio {r} leaves no channel of {name} ({c} channels); "
                f"use a ratio below {1 - 0.5 / c:.4f}"
            )
        kept.append(keep)
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
def prune_channels(model: VGG, ratios: dict[str, float], criterion: str = "norm") -> VGG:
    """A new, smaller VGG; ``model`` is not modified."""
    channels = kept_channels(list(model.channels), ratios)
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
