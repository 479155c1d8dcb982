"""Sensitivity scan: accuracy of the model with one layer pruned, for each layer and ratio.

The lab's scan, made reusable: for every layer a plan of the kind may set
(the model's fine-grained layers or channel groups, :func:`autoprune.sources.prunable`), pruned **alone** at each ratio of a grid
(default 0.4, 0.5, ..., 0.9, the lab's), the accuracy (percent) on a split with
no fine-tuning. Fine-grained ratios are sparsities; channel ratios are prune
ratios (``int(round((1 - r) * c))`` channels kept; for a group, of all its coupled layers).

Accuracies are measured on the **validation** split carved from the training
images (the lab scans on the test set, which leaks it into every choice made
from the curves).

:func:`scan_cached` keeps each scan on disk, keyed by the checkpoint's bytes,
the validation images, the data spec, validation size and seed, the kind, the
grid, the criterion and the device type (bf16 autocast on CUDA gives slightly
different accuracies than the CPU), so a second run with the same inputs costs
nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .data import Data, Split
from .errors import AutopruneError
from .files import atomic_path, atomic_write
from .kinds import KINDS
from .plan import PruningPlan, check_kind, plan_for, prune
from .sources import load_checkpoint, prunable
from .train import evaluate, resolve_device

log = logging.getLogger("autoprune")

DEFAULT_GRID: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
COLUMNS = ["layer", "ratio", "accuracy"]
_CACHE_VERSION = 1  # bump when the scan's definition changes


def normalize_kind(kind: str) -> str:
    """``fine`` is short for ``fine_grained``."""
    kind = {"fine": "fine_grained"}.get(kind, kind)
    check_kind(kind)
    return kind


def normalize_criterion(kind: str, criterion: str = "") -> str:
    """The criterion a plan of this kind resolves ``criterion`` to ("" -> the default)."""
    return PruningPlan(kind, {}, criterion).criterion


def check_grid(grid: Sequence[float] | None) -> tuple[float, ...]:
    """Sorted, distinct ratios in (0, 1]; the lab's grid when ``grid`` is None."""
    if grid is None:
        return DEFAULT_GRID
    try:
        values = [float(g) for g in grid]
    except (TypeError, ValueError):
        raise AutopruneError(f"cannot read grid {grid!r}; use ratios like 0.4,0.5,0.6") from None
    if not values:
        raise AutopruneError("the grid is empty; give at least one ratio, e.g. --grid 0.5,0.9")
    bad = [v for v in values if not 0.0 < v <= 1.0]
    if bad:
        raise AutopruneError(f"grid ratios must be in (0, 1], got {bad[0]}; e.g. --grid 0.4,0.5,0.6")
    return tuple(sorted(set(round(v, 10) for v in values)))


def parse_grid(text: str) -> tuple[float, ...]:
    """``"0.4,0.5,0.9"`` -> (0.4, 0.5, 0.9)."""
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise AutopruneError(f"cannot read grid {text!r}; use comma-separated ratios, e.g. 0.4,0.5,0.6") from None
    return check_grid(values)


def scan(
    model: nn.Module,
    split: Split,
    kind: str,
    grid: Sequence[float] | None = None,
    criterion: str = "",
    progress: bool = True,
) -> pd.DataFrame:
    """Accuracy (percent on ``split``, no fine-tuning) with each layer pruned alone.

    Returns a DataFrame with columns ``layer, ratio, accuracy`` (one row per
    layer and grid ratio, layers in network order) and the dense model's
    accuracy in ``df.attrs["dense_accuracy"]``. ``model`` is not modified.
    """
    kind = normalize_kind(kind)
    grid = check_grid(grid)
    criterion = plan_for(model, kind, {}, criterion).criterion  # the model's criteria
    view = prunable(model)
    layers = KINDS[kind].layers(view)
    if KINDS[kind].changes_shape:
        for r in grid:  # fail before any work if a grid ratio leaves some group with no channel
            view.kept({name: r for name in layers})
    device = next(model.parameters()).device
    split = split.to(device)
    dense = evaluate(model, split)
    log.info("sensitivity scan (%s, %s): dense accuracy %.2f%% on %d images",
             kind, criterion, dense, len(split))
    rows = []
    bar = tqdm(total=len(layers) * len(grid), desc=f"sensitivity {kind}", leave=False, unit="eval",
               disable=None if progress else True)  # None: only on a terminal
    for layer in layers:
        accs = []
        for r in grid:
            pruned = prune(model, plan_for(model, kind, {layer: r}, criterion)).model
            acc = evaluate(pruned, split)
            del pruned
            accs.append(acc)
            rows.append({"layer": layer, "ratio": float(r), "accuracy": acc})
            bar.update()
            bar.set_postfix(layer=layer, ratio=f"{r:g}", acc=f"{acc:.2f}%")
        log.info("sensitivity %s: %s", layer,
                 ", ".join(f"{r:g} -> {a:.2f}%" for r, a in zip(grid, accs)))
    bar.close()
    df = pd.DataFrame(rows, columns=COLUMNS)
    df.attrs["dense_accuracy"] = dense
    df.attrs["kind"] = kind
    df.attrs["criterion"] = criterion
    return df


def curves(df: pd.DataFrame) -> dict[str, list[list[float]]]:
    """layer -> [[ratio, accuracy], ...] (ratios ascending), in the DataFrame's layer order."""
    out: dict[str, list[list[float]]] = {}
    for layer in dict.fromkeys(df["layer"]):
        sub = df[df["layer"] == layer].sort_values("ratio")
        out[layer] = [[float(r), float(a)] for r, a in zip(sub["ratio"], sub["accuracy"])]
    return out


# --- the on-disk cache -------------------------------------------------------


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256_split(split: Split) -> str:
    h = hashlib.sha256()
    for t in (split.x, split.y):
        t = t.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _checkpoint_file(path: Path) -> Path:
    path = Path(path)
    return path / "model.pt" if path.is_dir() else path


def cache_key(inputs: dict) -> str:
    """Short sha256 of the JSON of everything a scan depends on."""
    blob = json.dumps(inputs, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _read_cache(cache_dir: Path, key: str) -> tuple[pd.DataFrame, dict] | None:
    csv, meta_path = cache_dir / f"{key}.csv", cache_dir / f"{key}.json"
    if not (csv.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        df = pd.read_csv(csv)
        if list(df.columns) != COLUMNS or "dense_accuracy" not in meta:
            raise ValueError("unexpected columns")
    except Exception as exc:  # a damaged entry is recomputed, not fatal
        log.warning("sensitivity scan: ignoring damaged cache entry %s (%s)", key, exc)
        return None
    df["layer"] = df["layer"].astype(str)
    df["ratio"] = df["ratio"].astype(float)
    df["accuracy"] = df["accuracy"].astype(float)
    return df, meta


def scan_cached(
    checkpoint_path: str | os.PathLike,
    data: Data,
    kind: str,
    grid: Sequence[float] | None = None,
    criterion: str = "",
    out_dir: str | os.PathLike = "reports/sensitivity",
    progress: bool = True,
    device: str | torch.device | None = "auto",
    source: str | None = None,
) -> tuple[pd.DataFrame, float, bool]:
    """Scan a checkpoint on ``data.val``, or reuse an identical earlier scan.

    The checkpoint may be of any source (its arch rebuilds it); ``source`` must
    name its ``module:`` source for user code to be imported.

    Writes ``<out_dir>/sensitivity-<kind>.csv`` (layer, ratio, accuracy,
    drop in points from dense) and ``<out_dir>/sensitivity-<kind>.png``, and keeps
    ``<out_dir>/.cache/<key>.csv`` + ``.json``. Returns
    ``(df, dense_accuracy, from_cache)``.
    """
    kind = normalize_kind(kind)
    grid = check_grid(grid)
    criterion = normalize_criterion(kind, criterion)
    ckpt = _checkpoint_file(Path(checkpoint_path))
    model, meta = load_checkpoint(ckpt, source)  # validates the file before anything is hashed
    dev = resolve_device(device)
    inputs = {
        "version": _CACHE_VERSION,
        "checkpoint_sha256": _sha256_file(ckpt),
        "data": data.spec,
        "val_size": len(data.val),
        "data_seed": int(getattr(data, "seed", 0)),
        "val_sha256": _sha256_split(data.val),
        "kind": kind,
        "grid": list(grid),
        "criterion": criterion,
        "device_type": dev.type,
    }
    key = cache_key(inputs)
    out_dir = Path(out_dir)
    cache_dir = out_dir / ".cache"
    cached = _read_cache(cache_dir, key)
    if cached is not None:
        df, entry = cached
        dense = float(entry["dense_accuracy"])
        log.info("sensitivity scan: reusing cached scan %s (%s, %s, grid %s, made %s)", key,
                 kind, criterion, ",".join(f"{g:g}" for g in grid), entry.get("created", "?"))
        from_cache = True
    else:
        _warn_if_split_differs(meta, data)
        model.to(dev)
        start = time.perf_counter()
        df = scan(model, data.val, kind, grid, criterion, progress)
        dense = float(df.attrs["dense_accuracy"])
        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(cache_dir / f"{key}.csv", df.to_csv(index=False))
        entry = {**inputs, "checkpoint": str(ckpt), "dense_accuracy": dense,
                 "seconds": time.perf_counter() - start,
                 "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write(cache_dir / f"{key}.json", json.dumps(entry, indent=2))
        log.info("sensitivity scan: cached as %s", key)
        from_cache = False
    df.attrs.update(dense_accuracy=dense, kind=kind, criterion=criterion, key=key)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = df.assign(drop=dense - df["accuracy"], dense_accuracy=dense)
    atomic_write(csv_path(out_dir, kind), report.to_csv(index=False, float_format="%.4f"))
    plot_scan(df, dense, kind, png_path(out_dir, kind), criterion=criterion, images=len(data.val))
    return df, dense, from_cache


def csv_path(out_dir: str | os.PathLike, kind: str) -> Path:
    return Path(out_dir) / f"sensitivity-{normalize_kind(kind)}.csv"


def png_path(out_dir: str | os.PathLike, kind: str) -> Path:
    return Path(out_dir) / f"sensitivity-{normalize_kind(kind)}.png"


def _warn_if_split_differs(meta: dict, data: Data) -> None:
    """Scanning on images the model was trained on would flatter every layer."""
    made = {k: meta.get(k) for k in ("data", "val_size", "data_seed")}
    if made["data"] is None:
        return
    now = {"data": data.spec, "val_size": len(data.val), "data_seed": int(getattr(data, "seed", 0))}
    diff = [f"{k} {made[k]!r} (checkpoint) vs {now[k]!r}" for k in now
            if made[k] is not None and made[k] != now[k]]
    if diff:
        log.warning("sensitivity scan: the checkpoint was trained with another split (%s); its "
                    "training images may be in this validation split", "; ".join(diff))


# --- the figure --------------------------------------------------------------


def plot_scan(
    df: pd.DataFrame,
    dense_accuracy: float,
    kind: str,
    path: str | os.PathLike,
    criterion: str = "",
    images: int | None = None,
) -> Path:
    """One accuracy-vs-ratio curve per layer and the dense accuracy as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind = normalize_kind(kind)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = curves(df)
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    cmap = plt.get_cmap("tab10")
    markers = "osD^v<>ph*"
    for i, (layer, points) in enumerate(data.items()):
        xs = [100 * r for r, _ in points]
        ys = [a for _, a in points]
        ax.plot(xs, ys, marker=markers[i % len(markers)], color=cmap(i % 10), label=layer, lw=1.6, ms=5)
    ax.axhline(dense_accuracy, color="black", ls="--", lw=1.2, label=f"dense {dense_accuracy:.2f}%")
    ax.set_xlabel(KINDS[kind].scan_label)
    where = f"validation accuracy (%{', ' + str(images) + ' images' if images else ''})"
    ax.set_ylabel(where)
    ax.set_ylim(0, 100)
    ratios = sorted({r for points in data.values() for r, _ in points})
    ax.set_xticks([100 * r for r in ratios])
    ax.set_xticklabels([f"{100 * r:g}" for r in ratios])
    ax.set_title(f"Sensitivity scan, {KINDS[kind].title} pruning ({criterion}): one layer pruned at a time, "
                 "no fine-tuning", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=8, ncol=2, framealpha=0.9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path
