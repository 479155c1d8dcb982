"""Shared fixtures: the CIFAR-10 subset, a tiny trained checkpoint, and a CLI runner."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# ../shared/data relative to the repository root (see /work/shared/data/README.md).
SUBSET = REPO.parent / "shared/data/cifar10-subset.npz"

TINY_WIDTH = 0.125
TINY_DATA = "synthetic:600"


def run_cli(*args, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m autoprune ARGS`` from the repository root; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "autoprune", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


@pytest.fixture
def subset_path() -> Path:
    """The 5,482 + 1,017 image CIFAR-10 subset; the test is skipped when it is absent."""
    if not SUBSET.is_file():
        pytest.skip(f"CIFAR-10 subset not found at {SUBSET} (expected ../shared/data/ beside the repo)")
    return SUBSET


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A width-0.125 VGG trained 1 epoch on synthetic:600 (seconds), saved by the library."""
    import torch

    from autoprune.data import load_data
    from autoprune.model import build_model, save_checkpoint
    from autoprune.train import DENSE_RECIPE, TrainConfig, fit

    data = load_data(TINY_DATA, seed=0)
    torch.manual_seed(0)
    model = build_model("vgg", width=TINY_WIDTH)
    config = TrainConfig(epochs=1, **DENSE_RECIPE)
    history = fit(model, data, config, progress=False)
    path = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    save_checkpoint(model, path, width=TINY_WIDTH, data=TINY_DATA, data_seed=0,
                    val_accuracy=history[-1]["val_accuracy"], made_by="tests/conftest.py",
                    recipe=config.to_dict())
    return path
