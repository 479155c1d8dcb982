"""The notebook API: autoprune.prune(model, train=, val=, ...) on tensors, the same study underneath."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import autoprune
from autoprune.api import images_and_labels
from autoprune.data import synthetic_images
from autoprune.errors import AutopruneError
from autoprune.pick import pick
from autoprune.study import open_existing
from autoprune.train import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """A user's model, not built by autoprune: rebuilt as module:test_api:Net(width=...)."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                      nn.ReLU(), nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                      nn.BatchNorm2d(2 * width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        return self.fc(self.features(x))


def tensors(n: int, seed: int):
    x, y = synthetic_images(n, seed)
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(y)  # ToTensor-style floats


def test_prune_a_model_you_hold_on_your_tensors(tmp_path):
    torch.manual_seed(0)
    model = Net(width=8)
    train, val, test = tensors(200, 0), tensors(60, 1), tensors(60, 2)
    result = autoprune.prune(model, train, val, test, model_kwargs={"width": 8}, trials=2, max_size=0.5,
                             max_accuracy_drop=100.0, out_dir=tmp_path / "study", progress=False,
                             finetune={"epochs": 1}, priors={"grid": [0.5, 0.8]}, select={"top_k": 0},
                             latency={"repeats": 3, "warmup": 1, "predict": False})
    # the same study as the CLI's: two trials in it, the pick is what `autoprune pick` picks
    study, config = open_existing(result.storage_url, result.config.study.name)
    assert len(study.trials) == 2
    assert pick(study, config)[0].number == result.trial.number
    assert config.model.source == "module:test_api:Net" and config.model.kwargs == {"width": 8}
    # the picked model: physically smaller, its recorded accuracy on the validation images given
    data = config.load_data()
    assert len(data.val) == 60 and torch.equal(data.val.y, val[1])
    assert evaluate(result.model, data.val) == pytest.approx(result.trial.user_attrs["val_accuracy"], abs=1e-9)
    assert sum(p.numel() for p in result.model.parameters()) < sum(p.numel() for p in model.parameters())
    exported = result.export(tmp_path / "export")
    again = autoprune.load(tmp_path / "export", source="module:test_api:Net")
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(again(x), result.model(x))
    assert exported["trial"] == result.trial.number


def test_a_model_that_cannot_be_rebuilt_names_the_fix(tmp_path):
    with pytest.raises(AutopruneError) as exc:
        autoprune.prune(Net(width=4), tensors(50, 0), tensors(20, 1), out_dir=tmp_path, progress=False)
    assert str(exc.value) == (
        "cannot rebuild your model as module:test_api:Net with model_kwargs={} (checkpoint key "
        "'features.0.weight' has shape (4, 3, 3, 3), model expects (8, 3, 3, 3)); pass the source= and "
        "model_kwargs= that build it")


@pytest.mark.parametrize("split, message", [
    ((torch.zeros(4, 3, 28, 28), torch.zeros(4, dtype=torch.long)),
     "train images must be 32x32 RGB, (N, 32, 32, 3) or (N, 3, 32, 32), got [4, 28, 28, 3]"),
    ((torch.full((4, 3, 32, 32), -0.5), torch.zeros(4, dtype=torch.long)),
     "train images are floats outside [0, 1] (normalized?); pass uint8 images or ToTensor's [0, 1] floats: "
     "autoprune scales and augments them itself"),
    ((torch.zeros(4, 3, 32, 32), torch.zeros(3, dtype=torch.long)),
     "train labels must be one integer class per image, got torch.int64 [3] for 4 images"),
    ("cifar", "train must be (images, labels), a Dataset or a DataLoader, got str"),
])
def test_bad_splits_name_the_fix(split, message):
    with pytest.raises(AutopruneError) as exc:
        images_and_labels(split, "train")
    assert str(exc.value) == message


def test_datasets_and_loaders_give_the_same_arrays():
    x, y = tensors(10, 0)
    want = images_and_labels((x, y), "train")
    ds = torch.utils.data.TensorDataset(x, y)
    for split in (ds, torch.utils.data.DataLoader(ds, batch_size=3)):
        got = images_and_labels(split, "train")
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert want[0].dtype == np.uint8 and want[0].shape == (10, 32, 32, 3)
