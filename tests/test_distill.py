"""Knowledge distillation from the dense model in the fine-tune ([finetune] distill)."""

from __future__ import annotations

import copy
import dataclasses
import math
import re

import pytest
import torch
from torch import nn

from autoprune.config import StudyConfig, load_config
from autoprune.data import Data, Split, load_data
from autoprune.errors import AutopruneError
from autoprune.model import build_model
from autoprune.objective import finetune
from autoprune.plan import PruningPlan, prune
from autoprune.train import TrainConfig, distillation_loss, fit

from conftest import assert_cli_error, run_main

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTH = 0.0625
RECIPE = dict(epochs=1, batch_size=64, lr=0.05)


@pytest.fixture(scope="module")
def data() -> Data:
    return load_data("synthetic:240", val_size=48, seed=0)


def model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("vgg", width=WIDTH)


def weights(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def differ(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


# --- the loss ---------------------------------------------------------------------------


def test_loss_is_hintons_formula_on_a_hand_made_batch():
    # Row 0: the teacher at T=2 says (3/4, 1/4), the student (1/2, 1/2); label 0, CE ln 2.
    # Row 1: the teacher is uniform, the student's softened odds are sqrt(3):1; label 1 at T=1 has
    # probability 1/4, CE ln 4.
    ln3 = math.log(3)
    student = torch.tensor([[0.0, 0.0], [ln3, 0.0]])
    teacher = torch.tensor([[2 * ln3, 0.0], [0.0, 0.0]])
    y = torch.tensor([0, 1])
    r3 = math.sqrt(3)
    kl0 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    kl1 = 0.5 * math.log(0.5 / (r3 / (r3 + 1))) + 0.5 * math.log(0.5 / (1 / (r3 + 1)))
    ce = (math.log(2) + math.log(4)) / 2
    for w in (0.0, 0.25, 1.0):
        expected = (1 - w) * ce + w * 2 ** 2 * (kl0 + kl1) / 2  # batchmean: the mean over the 2 rows
        got = distillation_loss(student, teacher, y, temperature=2.0, weight=w)
        assert got.item() == pytest.approx(expected, rel=1e-6, abs=1e-7), w


def test_loss_is_zero_kl_when_the_student_matches_the_teacher():
    logits = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    y = torch.tensor([2, 0])
    assert distillation_loss(logits, logits.clone(), y, 4.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert torch.equal(distillation_loss(logits, -logits, y, 4.0, 0.0), nn.functional.cross_entropy(logits, y))


# --- fit with a teacher ---------------------------------------------------------------


def test_weight_zero_teacher_changes_nothing(data):
    plain = model(0)
    history = fit(plain, data, TrainConfig(**RECIPE), progress=False)
    student, teacher = model(0), model(1)
    teacher_before = weights(teacher)
    distilled = fit(student, data, TrainConfig(**RECIPE, distill_weight=0.0), progress=False, teacher=teacher)
    assert_same(weights(student), weights(plain))
    assert [h["train_loss"] for h in distilled] == [h["train_loss"] for h in history]
    # The teacher ran in eval mode: its BatchNorm statistics, like its weights, are untouched.
    assert_same(weights(teacher), teacher_before)
    assert teacher.training  # its mode is restored


def test_teacher_mode_is_restored_when_training_fails(data):
    teacher = model(1)
    with pytest.raises(AutopruneError, match="training diverged"):
        fit(model(0), data, TrainConfig(**{**RECIPE, "lr": 1e30}), progress=False, teacher=teacher)
    assert teacher.training


def test_a_teacher_on_another_device_is_refused(data):
    with pytest.raises(AutopruneError, match="^the teacher is on meta but the model on cpu; move the teacher to cpu$"):
        fit(model(0), data, TrainConfig(**RECIPE), progress=False, teacher=model(1).to("meta"))


def relabelled(data: Data) -> Data:
    """The same images with every training label moved to the next class."""
    train = Split(data.train.x, (data.train.y + 1) % data.num_classes)
    return dataclasses.replace(data, train=train)


def test_weight_one_ignores_the_labels(data):
    """With w = 1 the loss is the teacher's alone: wrong labels give bit-identical weights; w = 0.5 does not."""
    out = {}
    for w in (1.0, 0.5):
        for name, d in (("labels", data), ("wrong", relabelled(data))):
            student = model(0)
            fit(student, d, TrainConfig(**RECIPE, distill_weight=w), progress=False, teacher=model(1))
            out[w, name] = weights(student)
    assert_same(out[1.0, "labels"], out[1.0, "wrong"])
    assert differ(out[0.5, "labels"], out[0.5, "wrong"])


class Spy(nn.Module):
    """Records each training-time call: the input and whether it ran in train mode / with grad."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x):
        self.calls.append((x.clone(), self.training, torch.is_grad_enabled()))
        return self.inner(x)


def test_teacher_sees_the_students_augmented_batches_in_eval_mode_without_grad(data):
    student, teacher = Spy(model(0)), Spy(model(1))  # the teacher in train mode: fit switches it
    fit(student, data, TrainConfig(**RECIPE), progress=False, teacher=teacher)
    steps = [c for c in student.calls if c[1]]  # evaluate()'s calls run in eval mode
    assert len(steps) == math.ceil(len(data.train) / RECIPE["batch_size"]) == len(teacher.calls)
    for (x_s, _, grad_s), (x_t, train_t, grad_t) in zip(steps, teacher.calls):
        assert torch.equal(x_s, x_t)
        assert (grad_s, train_t, grad_t) == (True, False, False)
    assert teacher.training  # and back


# --- config ---------------------------------------------------------------------------

STUDY = """
[study]
name = "distill"
[model]
width = 0.0625
[data]
spec = "synthetic:240"
[finetune]
{finetune}
"""


@pytest.mark.parametrize("line,message", [
    ("distill_temperature = 0", "[finetune] distill_temperature must be > 0, got 0"),
    ("distill_weight = 1.5", "[finetune] distill_weight must be in [0, 1], got 1.5"),
    ('distill = "yes"', '[finetune] distill must be true or false, got "yes" (a string)'),
])
def test_bad_distill_settings_are_one_line_errors(tmp_path, capsys, line, message):
    toml = tmp_path / "study.toml"
    toml.write_text(STUDY.format(finetune=line))
    with pytest.raises(AutopruneError) as err:
        load_config(toml)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert_cli_error(run_main(capsys, "search", toml, "--dry-run"), message)


@pytest.mark.parametrize("kwargs,message", [
    (dict(distill_temperature=0.0), "distill_temperature must be a finite number > 0"),
    (dict(distill_temperature=float("nan")), "distill_temperature must be a finite number > 0"),
    (dict(distill_temperature=1e20), "distill_temperature must be a finite number > 0 (at most 1.84e+19), got 1e+20"),
    (dict(distill_weight=-0.1), "distill_weight must be in [0, 1], got -0.1"),
    (dict(distill_weight=True), "distill_weight must be in [0, 1], got True"),
])
def test_train_config_refuses_bad_distill_values(kwargs, message):
    with pytest.raises(AutopruneError, match=re.escape(message)):
        TrainConfig(**kwargs)


def test_distill_settings_round_trip_through_the_stored_config(tmp_path):
    toml = tmp_path / "study.toml"
    toml.write_text(STUDY.format(finetune="distill = true\ndistill_temperature = 2.5\ndistill_weight = 0.9"))
    config = load_config(toml)
    assert (config.finetune.distill, config.finetune.distill_temperature, config.finetune.distill_weight) == (
        True, 2.5, 0.9)
    back = StudyConfig.from_dict(config.to_dict())
    assert back == config
    recipe = back.finetune_recipe()
    assert (recipe.distill_temperature, recipe.distill_weight) == (2.5, 0.9)
    # A config stored before these keys existed opens with distillation off.
    old = config.to_dict()
    for key in ("distill", "distill_temperature", "distill_weight"):
        del old["finetune"][key]
    assert StudyConfig.from_dict(old).finetune == dataclasses.replace(config.finetune, distill=False,
                                                                       distill_temperature=4.0, distill_weight=0.5)


# --- objective.finetune ------------------------------------------------------------------


def test_objective_finetune_distills_from_the_dense_model_when_on(data):
    dense = model(3).eval()
    dense_before = weights(dense)
    plan = PruningPlan("fine_grained", {"conv3": 0.5, "classifier": 0.5}, "", tuple(dense.channels))
    base = StudyConfig()
    base.finetune = dataclasses.replace(base.finetune, epochs=1, batch_size=64, lr=0.05)

    def tuned(distill: bool, weight: float) -> dict:
        config = copy.deepcopy(base)
        config.finetune.distill, config.finetune.distill_weight = distill, weight
        pruned = prune(dense, plan)
        finetune(pruned, dense, data, config, seed=1)
        assert all(torch.equal(pruned.model.state_dict()[n] * (1 - m), torch.zeros_like(m))
                   for n, m in pruned.masks.items())  # still pruned
        return weights(pruned.model)

    off = tuned(False, 0.5)
    assert differ(tuned(True, 0.5), off)
    assert_same(tuned(True, 0.0), off)  # on, but with weight 0: the teacher is passed and contributes nothing
    assert_same(weights(dense), dense_before)
    assert not dense.training
