"""The offline demo: the whole pipeline on synthetic data, minutes on a CPU."""

from __future__ import annotations

from pathlib import Path

from . import metrics
from .data import load_data
from .model import build_model, save_checkpoint
from .train import DENSE_RECIPE, TrainConfig, evaluate, fit


def run_demo(out_dir: Path = Path("reports/demo"), quiet: bool = False) -> dict:
    data = load_data("synthetic", seed=0)
    model = build_model("vgg", width=0.125)
    history = fit(model, data, TrainConfig(epochs=4, **DENSE_RECIPE), progress=not quiet, desc="dense")
    ckpt = save_checkpoint(model, Path(out_dir) / "dense.pt", width=0.125, data="synthetic",
                           val_accuracy=history[-1]["val_accuracy"], made_by="autoprune demo")
    result = {"checkpoint": str(ckpt), "val_accuracy": history[-1]["val_accuracy"],
              "test_accuracy": evaluate(model, data.test), **metrics.profile(model, repeats=20)}
    result["summary"] = (f"dense VGG (width 0.125) on {data.describe()}: val {result['val_accuracy']:.2f}%, "
                         f"{result['params']:,} params, {result['macs'] / 1e6:.2f} M MACs -> {ckpt}")
    return result
