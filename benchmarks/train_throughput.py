"""Training throughput: autoprune's loop against a bare loop, in one interleaved run.

What is compared, per width (default 0.25 and 0.5), batch 128, on the same
training images and from the same initial weights:

* ``autoprune``: ``autoprune.train.fit`` for one epoch on ``autoprune.data``
  splits (uint8 images on the device, crop/flip augmentation, shuffling, the
  one-cycle schedule, the per-epoch validation pass). Timed as the wall clock
  of the whole ``fit`` call; the time spent in its validation pass is measured
  too (by wrapping ``autoprune.train.evaluate``).
* ``bare``: ready float tensors in memory, forward / backward / SGD step
  (same optimizer settings), nothing else: the floor a training loop can reach.

The headline ratio (autoprune / bare images per second) counts the training
steps only: the fit wall clock minus its validation pass, with every other
cost of ``fit`` (optimizer and scheduler set-up, batching, augmentation,
shuffling, schedule, masks) charged to autoprune. Validation is left out of the
headline because the bare loop does no such work: it is extra work, not loop
overhead; its cost is reported beside it (``ratio_with_val``) so nothing is
hidden. Repeats alternate the order (A B, B A, ...) so machine noise and drift
hit both loops alike; the medians are reported. A breakdown measures the
pieces of autoprune's loop on their own (batching with and without
augmentation, mask re-application, the validation pass).

When CUDA is available (``--device cuda``, or ``auto`` with a GPU) it also
times one epoch of the full-width VGG over 50,000 32x32 images: autoprune's
``fit`` on synthetic uint8 tensors against a plain torchvision loop
(``DataLoader`` over PIL images with ToTensor + RandomCrop(32, 4) +
RandomHorizontalFlip, fp32, as in the lab), and records the card's name.

Results go to ``benchmarks/results/train_throughput-<device>.json``.

    python benchmarks/train_throughput.py                  # CPU, about 2-3 minutes
    python benchmarks/train_throughput.py --device cuda --images 8192
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import autoprune.train as train_mod
from autoprune.data import Data, Split, batches, load_data
from autoprune.model import PRUNABLE_LAYERS, build_model
from autoprune.train import DENSE_RECIPE, TrainConfig, apply_masks, fit

ROOT = Path(__file__).resolve().parents[1]
SUBSET = ROOT.parent / "shared/data/cifar10-subset.npz"
RESULTS = ROOT / "benchmarks" / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def param_name(layer: str) -> str:
    return "classifier.weight" if layer == "classifier" else f"backbone.{layer}.weight"


# --- the two loops -------------------------------------------------------------


def run_autoprune(base: nn.Module, data: Data, config: TrainConfig, device: torch.device,
                  masks: dict | None = None) -> dict:
    """One epoch of autoprune.train.fit; wall clock and the time inside its validation pass."""
    model = copy.deepcopy(base).to(device)
    spent = {"val": 0.0, "val_cpu": 0.0}
    evaluate = train_mod.evaluate

    def timed_evaluate(*args, **kwargs):
        sync(device)
        start, cpu = time.perf_counter(), time.process_time()
        out = evaluate(*args, **kwargs)
        sync(device)
        spent["val"] += time.perf_counter() - start
        spent["val_cpu"] += time.process_time() - cpu
        return out

    train_mod.evaluate = timed_evaluate  # fit() looks evaluate up in its module
    try:
        sync(device)
        start, cpu = time.perf_counter(), time.process_time()
        fit(model, data, config, masks=masks, progress=False)
        sync(device)
        total, total_cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        train_mod.evaluate = evaluate
    return {"total_s": total, "val_s": spent["val"], "train_s": total - spent["val"],
            "train_cpu_s": total_cpu - spent["val_cpu"], "val_cpu_s": spent["val_cpu"]}


def run_bare(base: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig,
             device: torch.device) -> dict:
    """Forward / backward / SGD step over ready float batches; nothing else."""
    model = copy.deepcopy(base).to(device)
    channels_last = device.type == "cuda"  # like fit(): same precision and layout on CUDA
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay, nesterov=True)
    loss_fn = nn.CrossEntropyLoss()
    bs = config.batch_size
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(y), bs):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(model(x[i:i + bs]), y[i:i + bs])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return {"train_s": time.perf_counter() - start, "train_cpu_s": time.process_time() - cpu}


# --- pieces of autoprune's loop, each on its own ----------------------------------


def breakdown(base: nn.Module, data: Data, config: TrainConfig, device: torch.device, repeats: int = 3) -> dict:
    """Seconds per epoch of the parts of fit() that the bare loop does not have."""
    model = copy.deepcopy(base).to(device)
    steps = -(-len(data.train) // config.batch_size)

    def median_time(fn) -> float:
        times = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def epoch_batches(augment: bool):
        gen = torch.Generator().manual_seed(0)
        for _ in batches(data.train, config.batch_size, shuffle=True, augment=augment, generator=gen,
                         channels_last=device.type == "cuda"):
            pass

    masks = {param_name(n): torch.ones_like(dict(model.named_parameters())[param_name(n)])
             for n in PRUNABLE_LAYERS}

    def mask_steps():
        for _ in range(steps):
            apply_masks(model, masks)

    return {
        "batches_no_augment_s": median_time(lambda: epoch_batches(False)),
        "batches_augment_s": median_time(lambda: epoch_batches(True)),
        "apply_masks_all_layers_s": median_time(mask_steps),
        "validation_pass_s": median_time(lambda: train_mod.evaluate(model, data.val)),
        # evaluate()'s batch: 128 on the CPU (its default there), 1024 on CUDA
        "validation_pass_batch128_s": median_time(lambda: train_mod.evaluate(model, data.val, 128)),
        "validation_pass_batch1024_s": median_time(lambda: train_mod.evaluate(model, data.val, 1024)),
        "steps_per_epoch": steps,
    }


# --- CPU / GPU comparison at small widths -------------------------------------------


def load_source(spec: str | None) -> Data:
    if spec is None:
        spec = f"npz:{SUBSET}" if SUBSET.is_file() else "synthetic:5000"
    return load_data(spec, seed=0)


def take(split: Split, n: int) -> Split:
    """The first n images of a split, cycling through it when it is smaller."""
    idx = torch.arange(n) % len(split)
    return Split(split.x[idx], split.y[idx])


def compare(args, device: torch.device) -> list[dict]:
    source = load_source(args.data)
    n = args.images
    val_n = max(1, n // 4)  # the default carve's proportion: validation = training / 4
    data = Data(source.spec, take(source.train, n), take(source.val, val_n), source.test).to(device)
    x_ready = data.train.x.float().div(255)  # the bare loop's ready float tensors (no augmentation)
    y_ready = data.train.y
    config = TrainConfig(epochs=1, batch_size=args.batch_size, seed=0, **{
        k: v for k, v in DENSE_RECIPE.items() if k != "batch_size"})
    rows = []
    for width in args.widths:
        torch.manual_seed(0)
        base = build_model("vgg", width=width)
        # warm-up: allocator, kernels, thread pools (a quarter epoch each, not timed)
        warm = Data(data.spec, take(data.train, 2 * args.batch_size), take(data.val, 64), data.test)
        run_autoprune(base, warm, config, device)
        run_bare(base, x_ready[: 2 * args.batch_size], y_ready[: 2 * args.batch_size], config, device)
        ours, bare = [], []
        for r in range(args.repeats):
            order = ("autoprune", "bare") if r % 2 == 0 else ("bare", "autoprune")
            for which in order:
                if which == "autoprune":
                    ours.append(run_autoprune(base, data, config, device))
                else:
                    bare.append(run_bare(base, x_ready, y_ready, config, device))
            print(f"  width {width} repeat {r + 1}/{args.repeats}: autoprune {ours[-1]['train_s']:.2f}s "
                  f"(+{ours[-1]['val_s']:.2f}s val), bare {bare[-1]['train_s']:.2f}s", file=sys.stderr)
        med = lambda runs, key: statistics.median(run[key] for run in runs)  # noqa: E731
        ours_train, ours_total, bare_train = med(ours, "train_s"), med(ours, "total_s"), med(bare, "train_s")
        # runs next to each other in time share the machine's state: ratio per pair, then the median
        pair_ratios = [b["train_s"] / o["train_s"] for o, b in zip(ours, bare)]
        pair_ratios_val = [b["train_s"] / o["total_s"] for o, b in zip(ours, bare)]
        # CPU time of this process: far less sensitive than the wall clock to other processes
        # competing for the cores (an OpenMP region stalls whenever one of its threads is descheduled)
        cpu_ratios = [b["train_cpu_s"] / o["train_cpu_s"] for o, b in zip(ours, bare)]
        pieces = breakdown(base, data, config, device) if not args.no_breakdown else {}
        rows.append({
            "width": width,
            "images": n,
            "val_images": val_n,
            "batch_size": args.batch_size,
            "autoprune_images_per_s": n / ours_train,
            "autoprune_images_per_s_with_val": n / ours_total,
            "bare_images_per_s": n / bare_train,
            "ratio": statistics.median(pair_ratios),
            "ratio_with_val": statistics.median(pair_ratios_val),
            "ratio_of_medians": bare_train / ours_train,
            "pair_ratios": pair_ratios,
            "ratio_best": min(b["train_s"] for b in bare) / min(o["train_s"] for o in ours),
            "autoprune_images_per_s_best": n / min(o["train_s"] for o in ours),
            "bare_images_per_s_best": n / min(b["train_s"] for b in bare),
            "cpu_time_ratio": statistics.median(cpu_ratios),
            "cpu_time_pair_ratios": cpu_ratios,
            "autoprune_runs": ours,
            "bare_runs": bare,
            "breakdown": pieces,
        })
    return rows


# --- GPU: one epoch of the full-width VGG over 50,000 images --------------------------


def gpu_epoch(args, device: torch.device) -> dict:
    import numpy as np
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    n, bs = args.gpu_images, args.gpu_batch_size
    gen = torch.Generator().manual_seed(0)  # random pixels: timing does not depend on content
    x_np = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=gen).numpy()  # NHWC, as CIFAR10.data
    y_np = torch.randint(0, 10, (n,), generator=gen).numpy()
    x = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(y_np)
    val = Split(x[:min(5000, n // 10)], y[:min(5000, n // 10)])  # CIFAR-10's carve: 5,000 of 50,000
    data = Data("synthetic-50000", Split(x, y), val, val).to(device)
    config = TrainConfig(epochs=1, batch_size=bs, seed=0,
                         **{k: v for k, v in DENSE_RECIPE.items() if k != "batch_size"})
    torch.manual_seed(0)
    base = build_model("vgg", width=1.0)

    class PILImages(Dataset):
        def __init__(self, images: np.ndarray, labels: np.ndarray):
            self.images, self.labels = images, labels
            self.transform = transforms.Compose([
                transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor()])

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])

    def plain_epoch(limit: int | None = None) -> float:
        model = copy.deepcopy(base).to(device).train()
        opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                              weight_decay=config.weight_decay, nesterov=True)
        loss_fn = nn.CrossEntropyLoss()
        ds = PILImages(x_np[:limit] if limit else x_np, y_np[:limit] if limit else y_np)
        loader = DataLoader(ds, batch_size=bs, shuffle=True, num_workers=args.workers, pin_memory=True,
                            persistent_workers=False)
        sync(device)
        start = time.perf_counter()
        for xb, yb in loader:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            loss = loss_fn(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
        return time.perf_counter() - start

    torch.backends.cudnn.benchmark = True
    warm = Data(data.spec, take(data.train, 4 * bs), take(data.val, 512), data.test)
    run_autoprune(base, warm, config, device)
    plain_epoch(limit=4 * bs)
    ours, plain = [], []
    for r in range(args.gpu_repeats):
        order = ("autoprune", "plain") if r % 2 == 0 else ("plain", "autoprune")
        for which in order:
            if which == "autoprune":
                ours.append(run_autoprune(base, data, config, device))
            else:
                plain.append(plain_epoch())
        print(f"  full width, {n} images, repeat {r + 1}: autoprune {ours[-1]['total_s']:.2f}s "
              f"({ours[-1]['val_s']:.2f}s val), plain DataLoader {plain[-1]:.2f}s", file=sys.stderr)
    ours_total = statistics.median(o["total_s"] for o in ours)
    ours_train = statistics.median(o["train_s"] for o in ours)
    plain_s = statistics.median(plain)
    return {
        "card": torch.cuda.get_device_name(device),
        "images": n,
        "batch_size": bs,
        "val_images": len(val),
        "dataloader_workers": args.workers,
        "autoprune": "fit(): uint8 tensors on the GPU, tensor-op augmentation, bf16 autocast, channels_last",
        "plain": "DataLoader over PIL images, RandomCrop(32, 4) + RandomHorizontalFlip + ToTensor, fp32",
        "autoprune_epoch_s": ours_train,
        "autoprune_epoch_s_with_val": ours_total,
        "plain_epoch_s": plain_s,
        "speedup": plain_s / ours_train,
        "speedup_with_val": plain_s / ours_total,
        "autoprune_runs": ours,
        "plain_runs": plain,
    }


# --- main -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default), cuda[:N] or auto")
    p.add_argument("--widths", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--repeats", type=int, default=7, help="timed runs of each loop per width (default 7)")
    p.add_argument("--images", type=int, default=1024, help="training images per run (default 1024)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--data", metavar="SPEC", help="data spec (default: the npz subset if present, else synthetic)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-breakdown", action="store_true", help="skip timing the pieces of fit() on their own")
    p.add_argument("--gpu-images", type=int, default=50_000, help="images in the full-width GPU epoch")
    p.add_argument("--gpu-batch-size", type=int, default=128)
    p.add_argument("--gpu-repeats", type=int, default=2)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader workers of the plain GPU loop")
    p.add_argument("--no-gpu-epoch", action="store_true", help="skip the full-width 50,000-image epoch")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/train_throughput-<device>.json)")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = train_mod.resolve_device(args.device)
    started = time.perf_counter()
    result = {
        "benchmark": "train_throughput",
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(argv),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "headline": "ratio = autoprune / bare images per second over the training steps "
                    "(fit() wall clock minus its validation pass), median over adjacent pairs of runs; "
                    "ratio_with_val counts the validation pass; cpu_time_ratio uses this process's CPU "
                    "time (robust to other processes with 1 thread, not with several: OpenMP threads "
                    "spin while a sibling waits for a core); ratio_best compares the fastest run of each",
        "load_average_before": os.getloadavg(),
    }
    busy = device.type == "cpu" and os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1)
    if busy:
        result["warning"] = (f"machine busy (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs): "
                             "other processes stall the OpenMP threads, wall-clock figures swing several-fold; "
                             "rerun with --threads 1 and read cpu_time_ratio")
        print(f"warning: {result['warning']}", file=sys.stderr)
    print(f"train throughput on {device} ({result['card'] or platform.processor() or 'cpu'}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", file=sys.stderr)
    result["compare"] = compare(args, device)
    if device.type == "cuda" and not args.no_gpu_epoch:
        result["gpu_epoch"] = gpu_epoch(args, device)
    result["seconds"] = time.perf_counter() - started
    result["load_average_after"] = os.getloadavg()

    out = args.out or RESULTS / f"train_throughput-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{'width':>6} {'autoprune img/s':>16} {'bare img/s':>11} {'ratio':>6} {'with val':>9} "
          f"{'cpu-time ratio':>15} {'best-run ratio':>15}")
    for row in result["compare"]:
        print(f"{row['width']:>6g} {row['autoprune_images_per_s']:>16.1f} {row['bare_images_per_s']:>11.1f} "
              f"{row['ratio']:>6.3f} {row['ratio_with_val']:>9.3f} {row['cpu_time_ratio']:>15.3f} "
              f"{row['ratio_best']:>15.3f}")
    print(f"load average {result['load_average_before'][0]:.1f} before, "
          f"{result['load_average_after'][0]:.1f} after, on {result['cpu_count']} CPUs")
    for row in result["compare"]:
        b = row["breakdown"]
        if b:
            print(f"width {row['width']:g}, per epoch of {row['images']} images: batching "
                  f"{b['batches_no_augment_s']:.3f}s, with augmentation {b['batches_augment_s']:.3f}s, "
                  f"masks on all layers {b['apply_masks_all_layers_s']:.3f}s, validation "
                  f"({row['val_images']} images) {b['validation_pass_s']:.3f}s (batch 128 "
                  f"{b['validation_pass_batch128_s']:.3f}s, batch 1024 {b['validation_pass_batch1024_s']:.3f}s)")
    if "gpu_epoch" in result:
        g = result["gpu_epoch"]
        print(f"\nfull-width VGG, {g['images']} images, batch {g['batch_size']} on {g['card']}: autoprune "
              f"{g['autoprune_epoch_s']:.2f}s (+val {g['autoprune_epoch_s_with_val'] - g['autoprune_epoch_s']:.2f}s), "
              f"plain DataLoader loop {g['plain_epoch_s']:.2f}s: {g['speedup']:.2f}x")
    if "warning" in result:
        print(f"warning: {result['warning']}")
    print(f"\nwrote {out} ({result['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
