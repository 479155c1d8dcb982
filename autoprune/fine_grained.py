"""Fine-grained (weight-by-weight) magnitude pruning, exact, and one-shot rules.

Per tensor at sparsity s (the lab's rule, made exact): s is clipped to [0, 1];
``round(numel * s)`` weights with the smallest ``|w|`` are zeroed. Where
magnitudes tie, the weight with the lower flat index is pruned first (a
stable sort), so the count is exact and the result deterministic; the lab's
``kthvalue`` threshold prunes every tie and so more than asked.

One-shot baselines, each returning per-layer sparsities for a target number of
zeros: uniform, global magnitude, and LAMP (Lee et al., 2021: score
``w_u^2 / sum_{|w_v| >= |w_u|} w_v^2`` within a layer, one global threshold).
"""

from __future__ import annotations

import torch
from torch import nn

from .model import PRUNABLE_LAYERS, param_name


def num_zeros(numel: int, sparsity: float) -> int:
    """Zeros the lab's rule asks for (Python's ``round``, as the lab)."""
    return int(round(numel * min(max(float(sparsity), 0.0), 1.0)))


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """0/1 mask (weight's dtype) with exactly ``round(numel * s)`` zeros at the smallest |w|."""
    k = num_zeros(weight.numel(), sparsity)
    mask = torch.ones(weight.numel(), dtype=weight.dtype, device=weight.device)
    if k > 0:
        order = torch.argsort(weight.detach().abs().flatten(), stable=True)
        mask[order[:k]] = 0
    return mask.view_as(weight)


def magnitude_masks(model: nn.Module, sparsities: dict[str, float],
                    layers: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Masks keyed by parameter name for every layer with a sparsity > 0.

    ``layers`` maps layer names to weight parameter names (any model: see
    ``autoprune.sources.prunable(model).fine_layers()``); by default the lab's
    VGG names (``conv3`` -> ``backbone.conv3.weight``).
    """
    params = dict(model.named_parameters())
    name = layers.__getitem__ if layers is not None else param_name
    return {
        name(layer): magnitude_mask(params[name(layer)], s)
        for layer, s in sparsities.items()
        if num_zeros(params[name(layer)].numel(), s) > 0
    }


def _weights(model: nn.Module, layers: dict[str, str] | None) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    layers = layers if layers is not None else {layer: param_name(layer) for layer in PRUNABLE_LAYERS}
    return {layer: params[p].detach() for layer, p in layers.items()}


def _global_rule(scores: dict[str, torch.Tensor], total_zeros: int) -> dict[str, float]:
    """Prune the ``total_zeros`` lowest scores across layers; per-layer sparsities."""
    names = list(scores)
    flat = torch.cat([scores[n].flatten().double() for n in names])
    owner = torch.cat([torch.full((scores[n].numel(),), i) for i, n in enumerate(names)])
    order = torch.argsort(flat, stable=True)[:total_zeros]
    counts = torch.bincount(owner[order], minlength=len(names))
    return {n: int(counts[i]) / scores[n].numel() for i, n in enumerate(names)}


def global_magnitude_sparsities(model: nn.Module, total_zeros: int,
                                layers: dict[str, str] | None = None) -> dict[str, float]:
    """One |w| threshold over all prunable tensors (``layers``: as :func:`magnitude_masks`)."""
    return _global_rule({n: w.abs() for n, w in _weights(model, layers).items()}, total_zeros)


def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """LAMP score of every weight: w^2 over the sum of w^2 of itself and all larger weights."""
    sq = weight.detach().flatten().double() ** 2
    order = torch.argsort(sq, stable=True)
    sorted_sq = sq[order]
    # suffix sums: for position i, sum of sorted_sq[i:]
    suffix = sorted_sq.flip(0).cumsum(0).flip(0)
    scores = torch.empty_like(sq)
    scores[order] = sorted_sq / suffix.clamp_min(torch.finfo(torch.float64).tiny)
    return scores.view_as(weight)


def lamp_sparsities(model: nn.Module, total_zeros: int, layers: dict[str, str] | None = None) -> dict[str, float]:
    """LAMP: one threshold on layer-normalised scores (keeps at least one weight per layer)."""
    return _global_rule({n: lamp_scores(w) for n, w in _weights(model, layers).items()}, total_zeros)
