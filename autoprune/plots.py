"""The lab's figures: weight histograms per prunable tensor and each layer's share of parameters.

Both write a PNG (matplotlib's Agg backend, no display needed) and return its path.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from torch import nn

from .files import atomic_path
from .model import PRUNABLE_LAYERS, param_name


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    return path


def weight_histograms(model: nn.Module, path: str | os.PathLike, bins: int = 128) -> Path:
    """One histogram per prunable tensor (conv weights, classifier weight), as in the lab.

    Zeros are left out of each histogram (a pruned tensor would otherwise show
    one spike at 0); each title gives the tensor's shape and sparsity.
    """
    plt = _pyplot()
    params = dict(model.named_parameters())
    layers = [n for n in PRUNABLE_LAYERS if param_name(n) in params]
    cols = 3
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(12, 3.2 * rows), dpi=110, squeeze=False)
    for ax, layer in zip(axes.flat, layers):
        w = params[param_name(layer)].detach().flatten().float().cpu()
        nonzero = w[w != 0]
        sparsity = 1.0 - nonzero.numel() / max(1, w.numel())
        if nonzero.numel():
            ax.hist(nonzero.numpy(), bins=bins, density=True, color="tab:blue", alpha=0.8)
        else:
            ax.text(0.5, 0.5, "all weights zero", ha="center", va="center", transform=ax.transAxes)
        shape = "x".join(str(s) for s in params[param_name(layer)].shape)
        ax.set_title(f"{layer} [{shape}], sparsity {100 * sparsity:.1f}%", fontsize=9)
        ax.set_xlabel("weight value (zeros excluded)", fontsize=8)
        ax.set_ylabel("density", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.suptitle("Weight distributions of the prunable tensors", fontsize=11)
    fig.tight_layout()
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


def param_shares(model: nn.Module) -> list[tuple[str, int]]:
    """(layer, parameters): each conv, the classifier (weight + bias), all BatchNorms together."""
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "backbone" and parts[1].startswith("bn"):
            key = "batchnorm"
        elif parts[0] == "backbone":
            key = parts[1]
        else:
            key = parts[0]
        counts[key] = counts.get(key, 0) + p.numel()
    bn = counts.pop("batchnorm", 0)
    items = list(counts.items())
    if bn:
        items.append(("batchnorm", bn))
    return items


def param_share_chart(model: nn.Module, path: str | os.PathLike) -> Path:
    """Bar chart of each layer's share of all parameters, percent (BatchNorms in one bar)."""
    plt = _pyplot()
    items = param_shares(model)
    total = sum(n for _, n in items)
    names = [k for k, _ in items]
    shares = [100.0 * n / total for _, n in items]
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    bars = ax.bar(names, shares, color="tab:blue")
    for bar, (_, n), share in zip(bars, items, shares):
        ax.annotate(f"{share:.2f}%\n{n:,}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_ylabel("share of parameters (%)")
    ax.set_xlabel("layer")
    ax.set_ylim(0, max(shares) * 1.2 if shares else 1)
    ax.set_title(f"Share of parameters by layer ({total:,} parameters in all)", fontsize=11)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    out = _save(fig, Path(path))
    plt.close(fig)
    return out
