"""Counting by the lab's rules: parameters, size, MACs, latency, per-layer table.

* Parameters: every ``nn.Parameter`` (conv / linear weights, classifier bias,
  BatchNorm weight and bias; not buffers).
* Size: parameters x 32 bits (float32), in MiB = 8 x 1024 x 1024 bits.
  ``nonzero_size_mib`` is the lab's sparse convention (count only nonzero
  parameters, ignore where they are); ``sparse_storage_mib`` is an honest
  on-disk figure: every pruned tensor stored as a bitmap of its positions (1
  bit per element) plus its nonzero values, whichever of that or dense is
  smaller.
* MACs for one 32x32 image: ``macs`` counts convolutions and the linear layer
  only (PyTorch's ``FlopCounterMode`` FLOPs / 2; the lab's 605.75 M), and
  ``macs_torchprofile`` is torchprofile's ``profile_macs`` total (adds
  BatchNorm and the pooling mean; the lab's 606.16 M and its pruned-model check).
* Latency: :mod:`autoprune.latency` (a runtime at a fixed thread count, the
  median and interquartile range of timed runs after warm-up).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .model import ARCH_ATTR

BITS_PER_MIB = 8 * 1024 * 1024
FLOAT_BITS = 32


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_nonzero_params(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())


def params_to_mib(n_params: int, bits: int = FLOAT_BITS) -> float:
    return n_params * bits / BITS_PER_MIB


def sparse_storage_bits(model: nn.Module) -> int:
    """Bits to store the model with pruned tensors as bitmap + nonzero values."""
    bits = 0
    for p in model.parameters():
        dense = p.numel() * FLOAT_BITS
        if p.dim() > 1:
            bits += min(dense, p.numel() + int(torch.count_nonzero(p)) * FLOAT_BITS)
        else:
            bits += dense
    return bits


def _example_input(model: nn.Module, batch_size: int = 1) -> torch.Tensor:
    """Zeros of the model's input size (its arch's ``input_size``; a 32x32 image by default)."""
    p = next(model.parameters())
    size = getattr(model, ARCH_ATTR, {}).get("input_size", (3, 32, 32))
    return torch.zeros(batch_size, *size, device=p.device, dtype=p.dtype)


@torch.no_grad()
def count_macs(model: nn.Module, example_input: torch.Tensor | None = None) -> int:
    """Conv + linear MACs for one example, by default a 32x32 image (PyTorch's flop counter / 2)."""
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(_example_input(model) if example_input is None else example_input)
    model.train(was_training)
    return counter.get_total_flops() // 2


@torch.no_grad()
def count_macs_torchprofile(model: nn.Module, example_input: torch.Tensor | None = None) -> int:
    """torchprofile's ``profile_macs`` total for one image (the lab's check)."""
    from torchprofile import profile_macs

    was_training = model.training
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings are noise here
        macs = int(profile_macs(model, _example_input(model) if example_input is None else example_input))
    model.train(was_training)
    return macs


def profile(
    model: nn.Module,
    *,
    latency: bool = True,
    batch_size: int | list[int] = 1,
    warmup: int = 20,
    repeats: int = 100,
    runtime: str = "torch",
    threads: int = 1,
    predict: bool = False,
    cache_dir=None,
    example_input: torch.Tensor | None = None,
) -> dict:
    """The figures that ``autoprune profile --json`` prints, as a dict.

    Latency is measured by :class:`autoprune.latency.Meter` (``runtime``, a fixed
    ``threads`` count, one or more batch sizes; ``latency_ms`` at the first) and,
    with ``predict``, predicted by its lookup table cached in ``cache_dir``.
    """
    params = count_params(model)
    nonzero = count_nonzero_params(model)
    out = {
        "params": params,
        "nonzero_params": nonzero,
        "size_mib": params_to_mib(params),
        "nonzero_size_mib": params_to_mib(nonzero),
        "sparse_storage_mib": sparse_storage_bits(model) / BITS_PER_MIB,
        "macs": count_macs(model, example_input),
        "macs_torchprofile": count_macs_torchprofile(model, example_input),
    }
    if latency:
        from .latency import Meter

        sizes = batch_size if isinstance(batch_size, (list, tuple)) else [batch_size]
        out.update(Meter(runtime, threads, sizes, warmup, repeats, predict=predict, cache_dir=cache_dir).figures(model))
    return out


def pruned_figures(model: nn.Module, dense: dict, example_input: torch.Tensor | None = None) -> dict:
    """What a trial (and a baseline) records of a pruned model, against the dense model's ``{'params', 'macs'}``.

    ``size_fraction``: nonzero parameters / dense parameters (the lab's size); ``nonzero_size_mib``;
    ``params``, ``nonzero_params``; ``macs`` (conv + linear, one ``example_input``) and ``macs_fraction``.
    """
    params = count_params(model)
    nonzero = count_nonzero_params(model)
    macs = count_macs(model, example_input)
    return {"size_fraction": nonzero / dense["params"], "nonzero_size_mib": params_to_mib(nonzero), "params": params,
            "nonzero_params": nonzero, "macs": macs, "macs_fraction": macs / dense["macs"]}


def layer_table(model: nn.Module) -> list[dict]:
    """Per parameter tensor: parameters, share of all parameters, sparsity (fractions)."""
    total = count_params(model)
    rows = []
    for name, p in model.named_parameters():
        n = p.numel()
        rows.append({
            "name": name,
            "shape": list(p.shape),
            "params": n,
            "share": n / total,
            "sparsity": 1.0 - int(torch.count_nonzero(p)) / n,
        })
    return rows
