"""Data: train / validation / test tensors for a data spec, and fast batches.

Data specs:

* ``cifar10`` - torchvision's CIFAR-10 under ``data_root`` (downloaded only
  when ``download=True``).
* ``npz:PATH`` - arrays ``x_train, y_train, x_test, y_test`` (uint8 HWC images,
  integer labels 0-9; checked on load), the format of ``../shared/data/cifar10-subset.npz``;
  with ``x_val, y_val`` too, those are the validation split (nothing is carved).
* ``synthetic`` or ``synthetic:N`` - N (default 2560) generated training images
  and N/5 test images in 10 classes of coloured shapes and textures,
  deterministic by seed; for the offline demo and fast tests.

Images stay uint8 NCHW on the device; :func:`batches` converts to [0, 1]
floats and augments (random crop with padding 4, horizontal flip) with tensor
operations, so on CUDA the whole pipeline runs on the GPU. The validation split
is carved from the training images with a fixed seed; configs are chosen on it,
never on the test images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .errors import AutopruneError

NUM_CLASSES = 10
SYNTHETIC_TRAIN = 2560
SYNTHETIC_MAX = 60_000  # CIFAR-10's size; generating N images takes ~25 KB each (float64) on the way
MAX_SEED = 2**32 - 1  # seeds are 32-bit everywhere (torch's generators overflow past 2**63)
MIN_TRAIN = 5  # the default validation split (a fifth) holds at least one image


@dataclass
class Split:
    """Images (uint8, N x 3 x 32 x 32) and labels (int64, N) on one device."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.x.to(device), self.y.to(device))


@dataclass
class Data:
    """The three splits of one data spec."""

    spec: str
    train: Split
    val: Split
    test: Split
    num_classes: int = NUM_CLASSES
    seed: int = 0  # seed of the validation carve (and of synthetic images)

    def to(self, device: torch.device | str) -> "Data":
        return Data(self.spec, self.train.to(device), self.val.to(device), self.test.to(device),
                    self.num_classes, self.seed)

    def describe(self) -> str:
        return f"{self.spec}: {len(self.train)} train / {len(self.val)} val / {len(self.test)} test images"


def default_val_size(n_train_images: int) -> int:
    """5,000 images (as for CIFAR-10) but at most a fifth of the training images.

    On the 5,482-image subset this gives 1,096 validation images: a standard
    error of about 1.5 accuracy points, the floor for comparing configs.
    """
    return min(5000, n_train_images // 5)


def load_data(
    spec: str,
    *,
    data_root: str | Path | None = None,
    download: bool = False,
    val_size: int | None = None,
    seed: int = 0,
) -> Data:
    """Load a data spec and carve the validation split (``val_size`` images, seeded)."""
    if not (isinstance(seed, int) and 0 <= seed <= MAX_SEED):
        raise AutopruneError(f"the data seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
    x_train, y_train, x_test, y_test, *given_val = _load_arrays(spec, data_root, download, seed)
    if given_val:  # the file's own validation split (autoprune.api saves the user's this way)
        x_val, y_val = given_val
        return Data(spec=spec, train=Split(_to_nchw(x_train), torch.as_tensor(y_train, dtype=torch.int64)),
                    val=Split(_to_nchw(x_val), torch.as_tensor(y_val, dtype=torch.int64)),
                    test=Split(_to_nchw(x_test), torch.as_tensor(y_test, dtype=torch.int64)), seed=seed)
    n = len(y_train)
    val_size = default_val_size(n) if val_size is None else int(val_size)
    if not 0 < val_size < n:
        raise AutopruneError(f"val_size must be between 1 and {n - 1} for {spec}, got {val_size}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:val_size].sort().values, order[val_size:].sort().values
    x_train, y_train = _to_nchw(x_train), torch.as_tensor(y_train, dtype=torch.int64)
    return Data(
        spec=spec,
        train=Split(x_train[train_idx], y_train[train_idx]),
        val=Split(x_train[val_idx], y_train[val_idx]),
        test=Split(_to_nchw(x_test), torch.as_tensor(y_test, dtype=torch.int64)),
        seed=seed,
    )


def _to_nchw(x_nhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x_nhwc)).permute(0, 3, 1, 2).contiguous()


def _load_arrays(spec: str, data_root, download: bool, seed: int):
    kind, _, arg = spec.partition(":")
    if kind == "cifar10" and not arg:
        return _cifar10(data_root, download)
    if kind == "npz" and arg:
        return _npz(Path(arg))
    if kind == "synthetic":
        try:
            n = int(arg) if arg else SYNTHETIC_TRAIN
        except ValueError:
            n = 0
        if not 50 <= n <= SYNTHETIC_MAX:
            raise AutopruneError(f"synthetic size must be an integer from 50 to {SYNTHETIC_MAX}, got {arg!r} "
                                 f"(e.g. synthetic:2560)")
        x_tr, y_tr = synthetic_images(n, seed=seed)
        x_te, y_te = synthetic_images(max(50, n // 5), seed=seed + 1_000_003)
        return x_tr, y_tr, x_te, y_te
    raise AutopruneError(
        f"unknown data spec {spec!r}; use cifar10, npz:PATH or synthetic[:N]"
    )


def _npz(path: Path):
    if not path.is_file():
        raise AutopruneError(f"data file not found: {path}; check the path in npz:PATH")
    try:
        with np.load(path, allow_pickle=False) as d:
            arrays = [d[k] for k in ("x_train", "y_train", "x_test", "y_test")]
            if "x_val" in d or "y_val" in d:
                arrays += [d["x_val"], d["y_val"]]
    except KeyError as exc:
        raise AutopruneError(f"{path} lacks array {exc}; expected x_train, y_train, x_test, y_test") from None
    except Exception as exc:
        raise AutopruneError(f"{path} is not a readable .npz file: {exc}") from None
    splits = [("train", arrays[0], arrays[1]), ("test", arrays[2], arrays[3])] + (
        [("val", arrays[4], arrays[5])] if len(arrays) > 4 else [])
    for split, x, y in splits:
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
            raise AutopruneError(f"{path}: x_{split} must be uint8 [N, 32, 32, 3], got {x.dtype} {list(x.shape)}")
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise AutopruneError(f"{path}: y_{split} must be a 1-d array of integer class labels, got {y.dtype} "
                                 f"{list(y.shape)}; save the labels as int64 [N]")
        if len(y) != len(x):
            raise AutopruneError(f"{path}: x_{split} has {len(x)} images but y_{split} has {len(y)} labels; "
                                 "save one label per image")
        if len(y) and not (0 <= y.min() and y.max() < NUM_CLASSES):
            bad = y[(y < 0) | (y >= NUM_CLASSES)][0]
            raise AutopruneError(f"{path}: y_{split} holds label {bad}; labels must be class numbers 0 to "
                                 f"{NUM_CLASSES - 1} (CIFAR-10)")
    for split, _, y in splits[1:]:
        if len(y) == 0:
            raise AutopruneError(f"{path}: x_{split} holds no images; save at least one {split} image")
    if len(arrays[1]) < MIN_TRAIN:
        raise AutopruneError(f"{path}: x_train holds {len(arrays[1])} images; at least {MIN_TRAIN} are needed "
                             "to carve a validation split from them")
    return arrays


def _cifar10(data_root, download: bool):
    from torchvision.datasets import CIFAR10  # imported here: only this spec needs it

    root = Path(data_root or "data")
    try:
        train = CIFAR10(str(root), train=True, download=download)
        test = CIFAR10(str(root), train=False, download=download)
    except RuntimeError as exc:
        raise AutopruneError(
            f"CIFAR-10 not found under {root} ({str(exc).strip()}); pass --data-root DIR "
            "holding cifar-10-batches-py, or --download"
        ) from None
    return train.data, np.asarray(train.targets), test.data, np.asarray(test.targets)


def synthetic_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 32x32 RGB uint8 images (NHWC) in 10 classes, deterministic by seed.

    Each class is a shape or texture (disc, square, ring, cross, triangle, and
    horizontal, vertical, diagonal stripes, checkerboard, dots) drawn at a random
    place and scale in a colour near the class's hue, on a random dark
    background, with pixel noise: learnable by a small VGG, but not trivially.
    """
    rng = np.random.default_rng(seed)
    y = np.arange(n) % NUM_CLASSES
    rng.shuffle(y)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    cx = rng.uniform(10, 22, n)[:, None, None]
    cy = rng.uniform(10, 22, n)[:, None, None]
    r = rng.uniform(5, 10, n)[:, None, None]
    period = rng.uniform(4, 8, n)[:, None, None]
    dx, dy = xx - cx, yy - cy
    shapes = [
        dx**2 + dy**2 <= r**2,  # disc
        (np.abs(dx) <= r * 0.8) & (np.abs(dy) <= r * 0.8),  # square
        np.abs(np.sqrt(dx**2 + dy**2) - r) <= 1.5,  # ring
        ((np.abs(dx) <= 1.5) | (np.abs(dy) <= 1.5)) & (np.abs(dx) <= r) & (np.abs(dy) <= r),  # cross
        (dy <= r * 0.7) & (dy >= np.abs(dx) * 1.6 - r * 0.9),  # triangle
        (yy % period) < period / 2,  # horizontal stripes
        (xx % period) < period / 2,  # vertical stripes
        ((xx + yy) % period) < period / 2,  # diagonal stripes
        ((xx // (period / 1.5) + yy // (period / 1.5)) % 2) == 0,  # checkerboard
        ((xx % period) < 2) & ((yy % period) < 2),  # dots
    ]
    mask = np.zeros((n, 32, 32), dtype=bool)
    for c, m in enumerate(shapes):
        sel = y == c
        mask[sel] = np.broadcast_to(m, (n, 32, 32))[sel]
    hue = (y / NUM_CLASSES + rng.normal(0, 0.04, n)) % 1.0
    fg = _hsv_to_rgb(hue, rng.uniform(0.6, 1.0, n), rng.uniform(0.7, 1.0, n))
    bg = rng.uniform(0.0, 0.35, (n, 3))
    img = np.where(mask[..., None], fg[:, None, None, :], bg[:, None, None, :])
    img = img + rng.normal(0, 0.08, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), y.astype(np.int64)


def _hsv_to_rgb(h, s, v) -> np.ndarray:
    k = np.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], axis=1)
    return v[:, None] - (v * s)[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def batches(
    split: Split,
    batch_size: int,
    *,
    shuffle: bool = False,
    augment: bool = False,
    generator: torch.Generator | None = None,
    channels_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Float batches in [0, 1] from a split; crop/flip augmentation with tensor ops.

    Random numbers come from ``generator`` (on the CPU) so a seed fixes the
    order and the augmentation whatever the device.
    """
    n = len(split)
    device = split.x.device
    order = torch.randperm(n, generator=generator).to(device) if shuffle else torch.arange(n, device=device)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        x, y = split.x[idx], split.y[idx]
        if augment:
            x = random_crop_flip(x, generator)
        x = x.float().div_(255)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, y


def random_crop_flip(x: torch.Tensor, generator: torch.Generator | None = None, padding: int = 4) -> torch.Tensor:
    """RandomCrop(32, padding) + RandomHorizontalFlip for a whole uint8 batch at once."""
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator).to(x.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    rows = offsets[0][:, None] + torch.arange(h, device=x.device)  # b x h
    cols = offsets[1][:, None] + torch.arange(w, device=x.device)  # b x w
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch_i = torch.arange(b, device=x.device)[:, None, None, None]
    chan_i = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch_i, chan_i, rows[:, None, :, None], cols[:, None, None, :]]
