"""Untrusted input: checkpoints, npz data files, sparse files and hyper-parameters.

Each bad input must end in one line that names the problem and the fix
(AutopruneError; the CLI: exit 2, no traceback), before anything is allocated
from a declared size; good input must load exactly as before.
"""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import optuna
import pytest
import torch

import autoprune
from autoprune import model as model_module
from autoprune.data import load_data, synthetic_images
from autoprune.errors import AutopruneError
from autoprune.export import load_sparse, save_sparse
from autoprune.model import build_model, load_checkpoint
from autoprune.train import TrainConfig, fit

from conftest import TINY_WIDTH
from conftest import assert_cli_error, run_main, write_study


pytestmark = pytest.mark.usefixtures("one_thread")


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


# =============================================================================
# checkpoints
# =============================================================================


@pytest.fixture(scope="module")
def tiny_obj(tiny_checkpoint) -> dict:
    return torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)


def _arch(**changes):
    return lambda obj: obj["autoprune"]["arch"].update(changes)


def _tensor(key, make):
    return lambda obj: obj["state_dict"].__setitem__(key, make(obj["state_dict"][key]))


def _nan_at(key, value):
    def mutate(obj):
        obj["state_dict"][key].view(-1)[3] = value
    return mutate


# (mutation of the tiny checkpoint, fragments of the one-line error)
BAD_CHECKPOINTS = {
    # metadata that would allocate 14 GB / 25 TB if it were believed
    "channels-20000": (_arch(channels=[20000] * 8),
                       ["metadata says conv0 has 20000 channels", "'backbone.conv0.weight' has shape (8, 3, 3, 3)",
                        "fix or drop"]),
    "num_classes-1e11": (_arch(num_classes=1e11), ["arch.num_classes must be an integer, got 100000000000.0"]),
    "num_classes-int": (_arch(num_classes=10**11),
                        ["metadata says num_classes 100000000000", "'classifier.weight' has shape (10, 64)"]),
    "arch-str": (lambda o: o["autoprune"].update(arch="xy"), ["metadata 'arch' must be a dict", "'xy'"]),
    "arch-no-channels": (lambda o: o["autoprune"]["arch"].pop("channels"), ["arch.channels must be 8 integers"]),
    "channels-str": (_arch(channels=["a"]), ["arch.channels must be 8 integers", "['a']"]),
    "channels-float": (_arch(channels=[8.0, 16, 32, 32, 64, 64, 64, 64]), ["arch.channels must be 8 integers"]),
    "arch-name-int": (lambda o: o["autoprune"].update(arch={"name": 5}), ["arch.name 5 is not a known model"]),
    "meta-not-dict": (lambda o: o.update(autoprune=[1, 2]), ["metadata 'autoprune' must be a dict"]),
    # tensors that do not fit the model
    "int-weight": (_tensor("backbone.conv0.weight", lambda t: t.long()),
                   ["'backbone.conv0.weight' has dtype torch.int64", "expects torch.float32"]),
    "complex-bias": (_tensor("classifier.bias", lambda t: t.to(torch.complex64)),
                     ["'classifier.bias' has dtype torch.complex64"]),
    "float-counter": (_tensor("backbone.bn0.num_batches_tracked", lambda t: t.float()),
                      ["'backbone.bn0.num_batches_tracked' has dtype torch.float32", "expects torch.int64"]),
    "wrong-ndim": (_tensor("backbone.bn0.weight", lambda t: t[None]),
                   ["'backbone.bn0.weight' has shape (1, 8)", "expects (8,)"]),
    "conv-2d": (_tensor("backbone.conv3.weight", lambda t: t.flatten(1)), ["no 4-d 'backbone.conv3.weight'"]),
    "not-a-tensor": (_tensor("backbone.bn0.weight", lambda t: t.tolist()),
                     ["entry 'backbone.bn0.weight' is a list, not a tensor"]),
    "int-key": (lambda o: o["state_dict"].__setitem__(3, torch.zeros(1)), ["non-string key 3"]),
    "nan-weight": (_nan_at("backbone.conv3.weight", float("nan")),
                   ["'backbone.conv3.weight' holds 1 NaN/Inf values", "retrain with a lower learning rate"]),
    "inf-running-var": (_nan_at("backbone.bn2.running_var", float("inf")),
                        ["'backbone.bn2.running_var' holds 1 NaN/Inf values"]),
    # shapes the file does not store: stride-0 views and sparse tensors declare 14 GB in a 2 KB file
    "expanded-view": (_tensor("backbone.conv0.weight", lambda t: torch.zeros(1).expand(20000, 3, 3, 3)),
                      ["declares shape (20000, 3, 3, 3)", "expanded view", "tensor.contiguous()"]),
    "all-expanded": (lambda o: o["state_dict"].update(
        {k: torch.zeros(1).expand(20000, *v.shape[1:]) for k, v in o["state_dict"].items() if v.dim() == 4}),
        ["declares shape (20000, 3, 3, 3)"]),
    "sparse": (_tensor("backbone.conv1.weight", lambda t: t.to_sparse()),
               ["'backbone.conv1.weight' is not a plain dense tensor", "to_dense()"]),
}


@pytest.fixture
def no_vgg_built(monkeypatch):
    """Fail the test (instead of allocating) if a real VGG is built; meta-device models are fine."""
    real = model_module.MODELS["vgg"]

    def guarded(channels, num_classes=10):
        if torch.empty(0).device.type != "meta":  # inside `with torch.device("meta")` nothing is allocated
            raise AssertionError(f"a VGG {channels} x {num_classes} was built before the checkpoint was checked")
        return real(channels, num_classes)

    monkeypatch.setitem(model_module.MODELS, "vgg", guarded)


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_refused_before_building(case, tiny_obj, tmp_path, capsys, no_vgg_built):
    mutate, needles = BAD_CHECKPOINTS[case]
    obj = copy.deepcopy(tiny_obj)
    mutate(obj)
    path = tmp_path / f"{case}.pt"
    torch.save(obj, path)
    with pytest.raises(AutopruneError) as excinfo:
        autoprune.load(path)
    message = one_line_error(excinfo)
    for needle in needles:
        assert needle in message, (needle, message)
    assert_cli_error(run_main(capsys, "eval", "--checkpoint", path, "--data", "synthetic:200"), *needles)


def test_caller_width_is_checked_before_building(tiny_checkpoint, no_vgg_built):
    # width 1000 would be a 9e12-parameter model: the shapes are compared on the meta device first
    with pytest.raises(AutopruneError, match=r"'backbone\.conv0\.weight' has shape \(8, 3, 3, 3\), model expects "
                                             r"\(64000, 3, 3, 3\)"):
        load_checkpoint(tiny_checkpoint, width=1000)


def test_good_variants_still_load(tiny_obj, tmp_path):
    sd = tiny_obj["state_dict"]
    lab_half = tmp_path / "lab-half.pt"  # the lab's format (no metadata), saved in half precision
    torch.save({"state_dict": {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}}, lab_half)
    model, meta = load_checkpoint(lab_half)
    assert meta["arch"] == tiny_obj["autoprune"]["arch"]
    loaded = model.state_dict()
    assert all(loaded[k].dtype == sd[k].dtype for k in sd)
    assert all(torch.equal(loaded[k], sd[k].half().to(sd[k].dtype)) for k in sd if sd[k].is_floating_point())

    partial = tmp_path / "partial-name.pt"  # metadata without a name: vgg, as before
    torch.save({"state_dict": sd, "autoprune": {"arch": {k: v for k, v in tiny_obj["autoprune"]["arch"].items()
                                                          if k != "name"}}}, partial)
    model, _ = load_checkpoint(partial)
    assert all(torch.equal(model.state_dict()[k], sd[k]) for k in sd)


# =============================================================================
# npz data
# =============================================================================


@pytest.fixture(scope="module")
def npz_arrays() -> dict:
    x_train, y_train = synthetic_images(60, seed=0)
    x_test, y_test = synthetic_images(20, seed=1)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


BAD_NPZ = {
    "label-10": (lambda a: a["y_train"].__setitem__(7, 10), ["y_train holds label 10", "0 to 9"]),
    "label-negative": (lambda a: a["y_test"].__setitem__(0, -1), ["y_test holds label -1", "0 to 9"]),
    "labels-2d": (lambda a: a.update(y_train=a["y_train"][:, None]),
                  ["y_train must be a 1-d array of integer class labels", "[60, 1]", "int64 [N]"]),
    "labels-float": (lambda a: a.update(y_test=a["y_test"].astype(np.float32)),
                     ["y_test must be a 1-d array of integer class labels", "float32"]),
    "labels-short": (lambda a: a.update(y_train=a["y_train"][:50]),
                     ["x_train has 60 images but y_train has 50 labels", "one label per image"]),
    "images-short": (lambda a: a.update(x_test=a["x_test"][:10]),
                     ["x_test has 10 images but y_test has 20 labels"]),
    "no-test-images": (lambda a: a.update(x_test=a["x_test"][:0], y_test=a["y_test"][:0]),
                       ["x_test holds no images", "at least one test image"]),
    "too-few-train": (lambda a: a.update(x_train=a["x_train"][:3], y_train=a["y_train"][:3]),
                      ["x_train holds 3 images", "at least 5", "validation split"]),
}


@pytest.mark.parametrize("case", list(BAD_NPZ))
def test_bad_npz_is_refused(case, npz_arrays, tmp_path):
    arrays = {k: v.copy() for k, v in npz_arrays.items()}
    mutate, needles = BAD_NPZ[case]
    mutate(arrays)
    path = tmp_path / f"{case}.npz"
    np.savez(path, **arrays)
    with pytest.raises(AutopruneError) as excinfo:
        load_data(f"npz:{path}")
    message = one_line_error(excinfo)
    assert str(path) in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_bad_npz_in_eval_exits_2(npz_arrays, tiny_checkpoint, tmp_path, capsys):
    # before: "accuracy 0.00%" with exit 0 (labels 10..19 never match a prediction)
    path = tmp_path / "shifted.npz"
    np.savez(path, **{**npz_arrays, "y_test": npz_arrays["y_test"] + 10})
    assert_cli_error(run_main(capsys, "eval", "--checkpoint", tiny_checkpoint, "--data", f"npz:{path}"),
                     "y_test holds label 1")


def test_good_npz_variants_load(npz_arrays, tmp_path):
    path = tmp_path / "uint8-labels.npz"
    np.savez(path, **{**npz_arrays, "y_train": npz_arrays["y_train"].astype(np.uint8)})
    data = load_data(f"npz:{path}")
    assert data.train.y.dtype == torch.int64
    assert (len(data.train), len(data.val), len(data.test)) == (48, 12, 20)
    assert torch.equal(data.test.y, torch.from_numpy(npz_arrays["y_test"]))


def test_real_subset_loads_exactly_as_before(subset_path):
    data = load_data(f"npz:{subset_path}")
    assert (len(data.train), len(data.val), len(data.test)) == (4386, 1096, 1017)
    digest = hashlib.sha256()
    for split in (data.train, data.val, data.test):
        digest.update(split.x.numpy().tobytes())
        digest.update(split.y.numpy().tobytes())
    # sha256 of the three splits as loaded before these checks (commit b0dd16d)
    assert digest.hexdigest() == "fea58b122edd8af4010531b36979394af8279eeac050c9654545622a75d87056"


# =============================================================================
# sparse files
# =============================================================================


@pytest.fixture(scope="module")
def sparse_state() -> dict:
    torch.manual_seed(0)
    model = build_model("vgg", width=TINY_WIDTH)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.mul_((torch.rand(p.shape) < 0.3).float())  # 70% pruned
    return model.state_dict()


def test_sparse_round_trip_is_identical(sparse_state, tmp_path):
    path = tmp_path / "sparse.npz"
    save_sparse(sparse_state, path)
    back = load_sparse(path)
    assert list(back) == list(sparse_state)
    for key, t in sparse_state.items():
        assert back[key].dtype == t.dtype and back[key].shape == t.shape and torch.equal(back[key], t), key


@pytest.fixture
def sparse_arrays(sparse_state, tmp_path) -> dict:
    path = tmp_path / "good.npz"
    save_sparse(sparse_state, path)
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


W = "backbone.conv1.weight"  # (16, 8, 3, 3): 1152 elements, a 144-byte mask

BAD_SPARSE = {
    # 50000 x 50000 x 1 x 1 floats: 9.3 GiB declared by a 144-byte mask
    "huge-shape": (lambda a: a.update({f"{W}::shape": np.array([50000, 50000, 1, 1])}),
                   [f"{W}::mask must be 312500000 packed bytes", "(50000, 50000, 1, 1)", "got uint8 [144]"]),
    "negative-dim": (lambda a: a.update({f"{W}::shape": np.array([-16, -8, 3, 3])}),
                     [f"{W}::shape must list at most 32 non-negative integer dims"]),
    "float-dims": (lambda a: a.update({f"{W}::shape": np.array([16.0, 8, 3, 3])}),
                   [f"{W}::shape must list", "integer dims"]),
    "too-many-values": (lambda a: a.update({f"{W}::values": np.append(a[f"{W}::values"], 1.0)}),
                        [f"{W}::values must hold", "(the mask's set bits)"]),
    "values-complex": (lambda a: a.update({f"{W}::values": a[f"{W}::values"].astype(np.complex64)}),
                       [f"{W}::values has dtype complex64", "integer or float"]),
    "mask-int64": (lambda a: a.update({f"{W}::mask": a[f"{W}::mask"].astype(np.int64)}),
                   [f"{W}::mask must be 144 packed bytes (uint8)"]),
    "no-mask": (lambda a: a.pop(f"{W}::mask"), [f"lacks array '{W}::mask'"]),
    "no-values": (lambda a: a.pop(f"{W}::values"), [f"lacks array '{W}::values'"]),
    "no-shape": (lambda a: a.pop(f"{W}::shape"), [f"lacks array '{W}::shape'"]),
    "no-format": (lambda a: a.pop("__format__"), ["not an autoprune sparse file"]),
    "stray-key": (lambda a: a.update(extra=np.zeros(3)), ["unexpected array 'extra'"]),
    "dense-and-sparse": (lambda a: a.update({f"{W}::dense": np.zeros((16, 8, 3, 3), np.float32)}),
                         [f"'{W}' is stored both dense and sparse"]),
}


@pytest.mark.parametrize("case", list(BAD_SPARSE))
def test_bad_sparse_file_is_refused(case, sparse_arrays, tmp_path):
    mutate, needles = BAD_SPARSE[case]
    mutate(sparse_arrays)
    path = tmp_path / f"{case}.npz"
    np.savez(path, **sparse_arrays)
    with pytest.raises(AutopruneError) as excinfo:
        load_sparse(path)
    message = one_line_error(excinfo)
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize("content", [None, b"not a zip file\n"], ids=["missing", "text"])
def test_unreadable_sparse_file(tmp_path, content):
    path = tmp_path / "sparse.npz"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(AutopruneError, match="is not a readable sparse file"):
        load_sparse(path)


# =============================================================================
# hyper-parameters and diverging training
# =============================================================================


@pytest.mark.parametrize("field,value,needle", [
    ("lr", float("inf"), "lr must be a finite number > 0 (at most 3.4e+38), got inf"),
    ("lr", float("nan"), "lr must be a finite number > 0 (at most 3.4e+38), got nan"),
    ("lr", 1e300, "got 1e+300"),  # finite, but SGD's float32 update would overflow with a traceback
    ("lr", 0.0, "lr must be a finite number > 0"),
    ("lr", -0.1, "lr must be a finite number > 0"),
    ("lr", "0.1", "lr must be a finite number > 0 (at most 3.4e+38), got '0.1'"),
    ("momentum", 1.0, "momentum must be in [0, 1), got 1.0"),
    ("momentum", -0.5, "momentum must be in [0, 1)"),
    ("momentum", float("nan"), "momentum must be in [0, 1), got nan"),
    ("weight_decay", -1e-4, "weight_decay must be a finite number >= 0"),
    ("weight_decay", float("inf"), "weight_decay must be a finite number >= 0 (at most 3.4e+38), got inf"),
    ("epochs", 0, "epochs must be an integer >= 1, got 0"),
    ("epochs", 2.5, "epochs must be an integer >= 1, got 2.5"),
    ("epochs", True, "epochs must be an integer >= 1, got True"),
    ("batch_size", 0, "batch_size must be an integer >= 1"),
    ("batch_size", 64.0, "batch_size must be an integer >= 1, got 64.0"),
])
def test_train_config_rejects_bad_hyper_parameters(field, value, needle):
    with pytest.raises(AutopruneError) as excinfo:
        TrainConfig(**{field: value})
    assert needle in one_line_error(excinfo)


def test_train_config_accepts_the_edges():
    config = TrainConfig(epochs=np.int64(1), lr=1e-6, momentum=0.0, weight_decay=0.0, batch_size=1)
    assert config.to_dict()["momentum"] == 0.0


@pytest.mark.parametrize("lr", ["inf", "nan"])
def test_cli_train_with_non_finite_lr_writes_nothing(tmp_path, capsys, lr):
    out = tmp_path / "never.pt"
    line = assert_cli_error(run_main(capsys, "train", "--data", "synthetic:100", "--width", TINY_WIDTH,
                                     "--epochs", "1", "--lr", lr, "--out", out), "lr")
    assert lr in line
    assert not out.exists()


@pytest.fixture(scope="module")
def small_data():
    return load_data("synthetic:200", seed=0)


def test_diverging_loss_stops_training(small_data):
    torch.manual_seed(0)
    model = build_model("vgg", width=TINY_WIDTH)
    with pytest.raises(AutopruneError) as excinfo:
        fit(model, small_data, TrainConfig(epochs=3, lr=1e30, batch_size=32), progress=False)
    message = one_line_error(excinfo)
    assert message.startswith("training diverged: loss became nan in epoch 1 of 3;"), message
    assert "lower the learning rate (lr 1e+30)" in message


def test_diverging_weights_stop_training(small_data):
    # One step: its loss is finite (computed before the update); the update (lr x a weight decay
    # near float32's maximum) overflows the conv weights.
    torch.manual_seed(0)
    model = build_model("vgg", width=TINY_WIDTH)
    config = TrainConfig(epochs=1, lr=100.0, weight_decay=3e38, batch_size=len(small_data.train), augment=False)
    with pytest.raises(AutopruneError, match=r"^training diverged: weights became NaN or Inf by epoch 1 of 1; "
                                             r"lower the learning rate \(lr 100\)$"):
        fit(model, small_data, config, progress=False)


def test_cli_train_divergence_writes_no_checkpoint(tmp_path, capsys):
    out = tmp_path / "never.pt"
    assert_cli_error(run_main(capsys, "train", "--data", "synthetic:100", "--width", TINY_WIDTH, "--epochs", "2",
                              "--lr", "1e30", "--batch-size", "16", "--out", out),
                     "training diverged: loss became nan in epoch 1 of 2")
    assert not out.exists()


@pytest.mark.parametrize("lr,needle", [("1e30", "trial 0 fine-tune: training diverged: loss became nan in epoch 1 "
                                                  "of 1; lower the learning rate (lr 1e+30)"),
                                       ("inf", "lr")])
def test_diverging_study_fails_its_trial_and_stops(tiny_checkpoint, tmp_path, capsys, lr, needle):
    toml = write_study(tmp_path / "diverge.toml", study={"name": "diverge", "trials": 2, "out_dir": tmp_path / "out"},
                       model={"checkpoint": tiny_checkpoint}, data={"spec": "synthetic:200"},
                       constraints={"max_size_fraction": 0.5}, finetune=f"lr = {lr}", priors={"enabled": False})
    assert_cli_error(run_main(capsys, "search", toml, "-q"), needle)
    db = tmp_path / "out" / "study.db"  # absent when the config is refused before the study is made
    trials = optuna.load_study(study_name="diverge", storage=f"sqlite:///{db}").trials if db.exists() else []
    # never a COMPLETE trial with NaN weights (size_fraction 1.0); the diverged one is FAILED
    assert not [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if lr == "1e30":
        assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL]
