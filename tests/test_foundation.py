"""Foundation: the lab's VGG and its counts, checkpoints, data, the training loop, CLI errors.

Figures come from /work/shared/REFERENCE.md (the pruning lab). No timing assertions.
"""

from __future__ import annotations

import copy
import json
import os
from collections import Counter
from functools import partial

import numpy as np
import pytest
import torch

from autoprune import metrics
from autoprune.data import (
    Split,
    batches,
    default_val_size,
    load_data,
    random_crop_flip,
    synthetic_images,
)
from autoprune.errors import AutopruneError
from autoprune.model import (
    CONV_NAMES,
    build_model,
    load_checkpoint,
    save_checkpoint,
    vgg_channels,
)
from autoprune.train import DENSE_RECIPE, TrainConfig, evaluate, fit

from conftest import TINY_DATA, TINY_WIDTH, assert_cli_error, run_cli, run_main

# --- the lab's figures -------------------------------------------------------

DENSE_PARAMS = 9_228_362
DENSE_MACS = 605_754_368  # convolutions + linear layer
DENSE_MACS_TORCHPROFILE = 606_164_480  # + BatchNorm and the pooling mean
LAYER_PARAMS = {
    "conv0": 1_728, "conv1": 73_728, "conv2": 294_912, "conv3": 589_824, "conv4": 1_179_648,
    "conv5": 2_359_296, "conv6": 2_359_296, "conv7": 2_359_296,
}
LAYER_SHARE_PERCENT = {
    "conv0": 0.02, "conv1": 0.80, "conv2": 3.20, "conv3": 6.39, "conv4": 12.78,
    "conv5": 25.57, "conv6": 25.57, "conv7": 25.57,
}
HALF_CHANNELS = [32, 64, 128, 128, 256, 256, 256, 256]
HALF_PARAMS = 2_310_186
HALF_MACS = 151_882_240
# Spatial size each conv runs at (32x32 input, MaxPool2d(2) after conv1, 3, 5, 7).
CONV_SIDE = [32, 32, 16, 16, 8, 8, 4, 4]


def lab_counts(channels: list[int], num_classes: int = 10) -> tuple[int, int]:
    """Parameters and conv+linear MACs of the lab's VGG, by hand (independent of the library)."""
    params = macs = 0
    cin = 3
    for cout, side in zip(channels, CONV_SIDE):
        params += 9 * cin * cout + 2 * cout  # conv weight (no bias) + BatchNorm weight, bias
        macs += 9 * cin * cout * side * side
        cin = cout
    params += cin * num_classes + num_classes
    macs += cin * num_classes
    return params, macs


# --- running the CLI -----------------------------------------------------------


# =============================================================================
# counts
# =============================================================================


def test_dense_counts_match_the_lab():
    model = build_model("vgg")
    params = metrics.count_params(model)
    assert params == DENSE_PARAMS
    assert round(metrics.params_to_mib(params), 2) == 35.20
    assert metrics.count_macs(model) == DENSE_MACS
    assert metrics.count_macs_torchprofile(model) == DENSE_MACS_TORCHPROFILE
    assert lab_counts(vgg_channels(1.0)) == (DENSE_PARAMS, DENSE_MACS)


def test_dense_per_layer_params_and_shares():
    model = build_model("vgg")
    rows = {r["name"]: r for r in metrics.layer_table(model)}
    for layer, n in LAYER_PARAMS.items():
        row = rows[f"backbone.{layer}.weight"]
        assert row["params"] == n, layer
        assert round(100 * row["share"], 2) == LAYER_SHARE_PERCENT[layer], layer
    assert rows["classifier.weight"]["params"] + rows["classifier.bias"]["params"] == 5_130
    bn = sum(r["params"] for name, r in rows.items() if ".bn" in name)
    assert bn == 5_504
    assert sum(r["params"] for r in rows.values()) == DENSE_PARAMS


def test_width_half_equals_explicit_channels():
    assert vgg_channels(0.5) == HALF_CHANNELS
    scaled = build_model("vgg", width=0.5)
    explicit = build_model("vgg", channels=HALF_CHANNELS)
    assert scaled.channels == explicit.channels == HALF_CHANNELS
    assert metrics.count_params(scaled) == metrics.count_params(explicit) == HALF_PARAMS
    assert metrics.count_macs(scaled) == metrics.count_macs(explicit) == HALF_MACS
    assert metrics.count_macs_torchprofile(scaled) == metrics.count_macs_torchprofile(explicit)
    assert lab_counts(HALF_CHANNELS) == (HALF_PARAMS, HALF_MACS)
    assert vgg_channels(0.125) == [8, 16, 32, 32, 64, 64, 64, 64]


def test_state_dict_names_are_the_labs():
    sd = build_model("vgg").state_dict()
    expected = []
    for i in range(8):
        expected.append(f"backbone.conv{i}.weight")
        expected += [f"backbone.bn{i}.{k}" for k in
                     ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    expected += ["classifier.weight", "classifier.bias"]
    assert list(sd) == expected
    assert not any(k.startswith("backbone.conv") and k.endswith(".bias") for k in sd)  # no conv bias
    assert tuple(sd["backbone.conv0.weight"].shape) == (64, 3, 3, 3)
    assert tuple(sd["backbone.conv7.weight"].shape) == (512, 512, 3, 3)
    assert tuple(sd["classifier.weight"].shape) == (10, 512)
    names = [n for n, _ in build_model("vgg").backbone.named_children()]
    assert names[:7] == ["conv0", "bn0", "relu0", "conv1", "bn1", "relu1", "pool0"]
    assert names[-4:] == ["conv7", "bn7", "relu7", "pool3"]


# =============================================================================
# autoprune profile
# =============================================================================


def _profile_json(run, *args) -> dict:
    result = run("profile", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_cli_profile_dense(capsys):
    out = _profile_json(partial(run_main, capsys), "--no-latency")
    assert out["params"] == DENSE_PARAMS
    assert round(out["size_mib"], 2) == 35.20
    assert abs(out["macs"] - 605.75e6) <= 0.001 * 605.75e6
    assert out["macs"] == DENSE_MACS
    assert out["macs_torchprofile"] == DENSE_MACS_TORCHPROFILE
    assert "latency_ms" not in out


def test_cli_profile_half_width(capsys):
    out = _profile_json(partial(run_main, capsys), "--no-latency", "--width", "0.5")
    assert out["params"] == HALF_PARAMS
    assert out["macs"] == HALF_MACS
    assert out["size_mib"] == HALF_PARAMS * 32 / (8 * 1024 * 1024)


def test_cli_profile_reports_latency():
    out = _profile_json(run_cli, "--repeats", "3")  # the real process
    assert out["params"] == DENSE_PARAMS
    assert out["latency_ms"] > 0
    assert out["latency_batch_size"] == 1


def test_cli_profile_checkpoint(tiny_checkpoint, capsys):
    result = run_main(capsys, "profile", "--json", "--no-latency", "--checkpoint", tiny_checkpoint)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert (out["params"], out["macs"]) == lab_counts(vgg_channels(TINY_WIDTH))


# =============================================================================
# checkpoints
# =============================================================================


def _eval_json(run, checkpoint, *args) -> dict:
    result = run("eval", "--checkpoint", checkpoint, "--data", TINY_DATA, "--json", "-q", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_lab_format_and_bare_state_dict_load_and_eval(tiny_checkpoint, tmp_path, capsys):
    trained, _ = load_checkpoint(tiny_checkpoint)
    sd = trained.state_dict()
    lab = tmp_path / "lab.pt"
    torch.save({"state_dict": sd}, lab)  # the lab's format: no metadata
    bare = tmp_path / "bare.pt"
    torch.save(sd, bare)

    data = load_data(TINY_DATA, seed=0)
    expected = evaluate(trained, data.test)
    for path in (lab, bare):
        model, meta = load_checkpoint(path)
        assert meta["arch"]["channels"] == vgg_channels(TINY_WIDTH)
        assert meta["arch"]["num_classes"] == 10
        assert not model.training
        loaded = model.state_dict()
        assert list(loaded) == list(sd)
        assert all(torch.equal(loaded[k], sd[k]) for k in sd)
        assert evaluate(model, data.test) == expected
        out = _eval_json(run_cli if path == lab else partial(run_main, capsys), path)  # one real process
        assert out["accuracy"] == expected
        assert out["split"] == "test" and out["images"] == len(data.test) == 120
        assert out["params"] == lab_counts(vgg_channels(TINY_WIDTH))[0]


def test_save_then_load_is_identical(tmp_path):
    torch.manual_seed(1)
    model = build_model("vgg", width=TINY_WIDTH)
    with torch.no_grad():  # non-default buffers too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(7)
    meta = {"width": TINY_WIDTH, "data": TINY_DATA, "val_accuracy": 12.5, "note": "x",
            "recipe": TrainConfig(epochs=2).to_dict(), "ratios": [0.1, 0.2]}
    path = save_checkpoint(model, tmp_path / "sub" / "model.pt", **meta)
    assert path.is_file() and sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["model.pt"]
    loaded, got = load_checkpoint(path)
    assert got == {"arch": model.arch(), **meta}
    a, b = model.state_dict(), loaded.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # an export directory holding model.pt loads the same way
    loaded_dir, got_dir = load_checkpoint(tmp_path / "sub")
    assert got_dir == got


def test_eval_matches_direct_evaluation_on_saved_checkpoint(tiny_checkpoint, capsys):
    model, meta = load_checkpoint(tiny_checkpoint)
    assert meta["width"] == TINY_WIDTH and meta["made_by"] == "tests/conftest.py"
    data = load_data(TINY_DATA, seed=0)
    for split in ("test", "val"):
        result = run_main(capsys, "eval", "--checkpoint", tiny_checkpoint, "--data", TINY_DATA,
                          "--split", split, "--json", "-q")
        assert result.returncode == 0, result.stderr
        out = json.loads(result.stdout)
        assert out["accuracy"] == evaluate(model, getattr(data, split))
        assert out["images"] == 120


# =============================================================================
# training loop
# =============================================================================


@pytest.fixture(scope="module")
def tiny_data():
    return load_data(TINY_DATA, seed=0)


def test_masks_are_kept_during_training(tiny_data):
    torch.manual_seed(0)
    model = build_model("vgg", width=TINY_WIDTH)
    gen = torch.Generator().manual_seed(123)
    params = dict(model.named_parameters())
    masks = {f"backbone.{c}.weight": (torch.rand(params[f"backbone.{c}.weight"].shape, generator=gen) < 0.5).float()
             for c in CONV_NAMES}
    before = {k: v.detach().clone() for k, v in params.items()}
    fit(model, tiny_data, TrainConfig(epochs=1, batch_size=128), masks=masks, progress=False)
    for name, mask in masks.items():
        w = params[name].detach()
        kept = mask.bool()
        assert 0.4 < kept.float().mean() < 0.6
        assert (w[~kept] == 0.0).all(), name
        assert (w[kept] != before[name][kept]).all(), name
    # unmasked tensors train normally
    assert not torch.equal(params["classifier.weight"], before["classifier.weight"])


def test_fit_is_deterministic_on_cpu(tiny_data):
    torch.manual_seed(3)
    base = build_model("vgg", width=TINY_WIDTH)
    config = TrainConfig(epochs=1, seed=5, **DENSE_RECIPE)
    a, b, c = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    ha = fit(a, tiny_data, config, progress=False)
    hb = fit(b, tiny_data, config, progress=False)
    fit(c, tiny_data, TrainConfig(epochs=1, seed=6, **DENSE_RECIPE), progress=False)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [h["train_loss"] for h in ha] == [h["train_loss"] for h in hb]
    assert [h["val_accuracy"] for h in ha] == [h["val_accuracy"] for h in hb]
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)  # another seed, another run


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_fit_with_four_steps(tiny_data, schedule):
    # 480 training images / batch 128 = 4 steps: OneCycleLR's warm-up would be exactly one
    # step, where torch divides by zero (a bug in autoprune.train.fit, fixed).
    model = build_model("vgg", width=TINY_WIDTH)
    config = TrainConfig(epochs=1, batch_size=128, schedule=schedule)
    history = fit(model, tiny_data, config, progress=False)
    assert len(history) == 1 and history[0]["epoch"] == 1
    assert np.isfinite(history[0]["train_loss"])
    assert 0.0 <= history[0]["val_accuracy"] <= 100.0


def test_evaluate_does_not_depend_on_batch_size(tiny_checkpoint, tiny_data):
    model, _ = load_checkpoint(tiny_checkpoint)
    model.train()
    accs = {bs: evaluate(model, tiny_data.val, bs) for bs in (None, 7, 128, 1024)}
    assert len(set(accs.values())) == 1, accs
    assert model.training  # mode restored
    with torch.no_grad():
        correct = (model.eval()(tiny_data.val.x.float() / 255).argmax(1) == tiny_data.val.y).sum()
    assert accs[None] == 100.0 * int(correct) / len(tiny_data.val)


def test_fit_on_epoch_stops_early(tiny_data):
    model = build_model("vgg", width=TINY_WIDTH)
    seen = []
    history = fit(model, tiny_data, TrainConfig(epochs=3, batch_size=256), progress=False,
                  on_epoch=lambda epoch, acc: seen.append((epoch, acc)) or True)
    assert len(history) == 1 and seen == [(1, history[0]["val_accuracy"])]


def test_cli_train_writes_a_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "dense.pt"
    result = run_main(capsys, "train", "--data", TINY_DATA, "--width", TINY_WIDTH, "--epochs", "1",
                     "--out", out, "--json", "-q")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    model, meta = load_checkpoint(out)
    assert meta["arch"]["channels"] == vgg_channels(TINY_WIDTH)
    assert meta["val_accuracy"] == report["val_accuracy"]
    assert meta["test_accuracy"] == report["test_accuracy"]
    assert meta["val_size"] == 120 and meta["data"] == TINY_DATA
    assert report["test_accuracy"] == evaluate(model, load_data(TINY_DATA, seed=0).test)


# =============================================================================
# data
# =============================================================================


def _row_index(rows: np.ndarray) -> dict[bytes, int]:
    index = {r.tobytes(): i for i, r in enumerate(rows)}
    assert len(index) == len(rows), "rows are not unique; the partition check needs unique rows"
    return index


def _positions(split: Split, index: dict[bytes, int]) -> list[int]:
    hwc = split.x.permute(0, 2, 3, 1).contiguous().numpy()
    return [index[r.tobytes()] for r in hwc]


def test_default_val_size():
    assert default_val_size(5482) == 1096
    assert default_val_size(50_000) == 5000
    assert default_val_size(480) == 96


@pytest.mark.parametrize("seed", [0, 1])
def test_synthetic_split_partitions_training_rows(seed):
    data = load_data(TINY_DATA, seed=seed)
    assert (len(data.train), len(data.val), len(data.test)) == (480, 120, 120)
    x_all, y_all = synthetic_images(600, seed=seed)
    index = _row_index(x_all)
    tr, va = _positions(data.train, index), _positions(data.val, index)
    assert not set(tr) & set(va)
    assert sorted(tr + va) == list(range(600))
    assert tr == sorted(tr) and va == sorted(va)  # order of the source is kept
    assert torch.equal(data.train.y, torch.as_tensor(y_all[tr]))
    assert torch.equal(data.val.y, torch.as_tensor(y_all[va]))
    for split in (data.train, data.val, data.test):
        assert split.x.dtype == torch.uint8 and tuple(split.x.shape[1:]) == (3, 32, 32)
        assert split.y.dtype == torch.int64


def test_synthetic_split_depends_on_seed_only():
    a, b, c = load_data(TINY_DATA, seed=0), load_data(TINY_DATA, seed=0), load_data(TINY_DATA, seed=1)
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(a, name).x, getattr(b, name).x)
        assert torch.equal(getattr(a, name).y, getattr(b, name).y)
    assert not torch.equal(a.val.x, c.val.x)
    assert not torch.equal(a.test.x, c.test.x)


def test_val_size_option():
    data = load_data(TINY_DATA, seed=0, val_size=50)
    assert (len(data.train), len(data.val)) == (550, 50)
    for bad in (0, 600, -1):
        with pytest.raises(AutopruneError, match="val_size"):
            load_data(TINY_DATA, val_size=bad)


def test_subset_splits(subset_path):
    with np.load(subset_path) as d:
        x_train, y_train, src_train = d["x_train"], d["y_train"], d["src_train"]
        x_test, y_test = d["x_test"], d["y_test"]
    data = load_data(f"npz:{subset_path}", seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (4386, 1096, 1017)
    for split in (data.train, data.val, data.test):
        assert split.y.dtype == torch.int64
        assert split.x.dtype == torch.uint8 and tuple(split.x.shape[1:]) == (3, 32, 32)
    # test split: the npz test arrays exactly, HWC -> CHW
    assert torch.equal(data.test.x, torch.from_numpy(x_test).permute(0, 3, 1, 2))
    assert torch.equal(data.test.y, torch.from_numpy(y_test))
    # validation + training partition the npz training rows (checked via provenance)
    index = _row_index(x_train)
    tr, va = _positions(data.train, index), _positions(data.val, index)
    src_tr, src_va = set(src_train[tr].tolist()), set(src_train[va].tolist())
    assert not src_tr & src_va
    assert src_tr | src_va == set(src_train.tolist())
    assert len(src_tr) == 4386 and len(src_va) == 1096
    assert torch.equal(data.train.y, torch.from_numpy(y_train[tr]))
    assert torch.equal(data.val.y, torch.from_numpy(y_train[va]))
    # no class is left out of validation
    assert set(Counter(data.val.y.tolist())) == set(range(10))
    # same seed, same carve; another seed, another carve (test split unchanged)
    again = load_data(f"npz:{subset_path}", seed=0)
    assert torch.equal(again.val.x, data.val.x) and torch.equal(again.train.y, data.train.y)
    other = load_data(f"npz:{subset_path}", seed=1)
    src_other = set(src_train[_positions(other.val, index)].tolist())
    assert len(src_other) == 1096 and src_other != src_va
    assert torch.equal(other.test.x, data.test.x)


def test_random_crop_flip_shapes_and_identity():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=gen)
    out = random_crop_flip(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.uint8
    # padding 0: no crop offset; the flip cannot be switched off, so each image is
    # itself or its mirror image, and both happen
    out0 = random_crop_flip(x, torch.Generator().manual_seed(1), padding=0)
    same = [torch.equal(o, i) for o, i in zip(out0, x)]
    mirrored = [torch.equal(o, i.flip(2)) for o, i in zip(out0, x)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert any(same) and any(mirrored)
    # ... so on mirror-symmetric images padding 0 is the identity
    sym = torch.cat([x[..., :16], x[..., :16].flip(3)], dim=3)
    assert torch.equal(random_crop_flip(sym, torch.Generator().manual_seed(2), padding=0), sym)
    # padding 4: each image is a 32x32 window of the zero-padded image, maybe mirrored
    padded = torch.nn.functional.pad(x[:8], (4, 4, 4, 4))
    for o, p in zip(out[:8], padded):
        windows = [p[:, r:r + 32, c:c + 32] for r in range(9) for c in range(9)]
        assert any(torch.equal(o, w) or torch.equal(o, w.flip(2)) for w in windows)
    # a seed fixes the augmentation
    assert torch.equal(out, random_crop_flip(x, torch.Generator().manual_seed(1)))


def test_batches_scale_and_order():
    x = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(10)
    got = list(batches(Split(x, y), 4))
    assert [len(b[1]) for b in got] == [4, 4, 2]
    xs = torch.cat([b[0] for b in got])
    assert xs.dtype == torch.float32 and torch.equal(xs, x.float() / 255)
    assert torch.equal(torch.cat([b[1] for b in got]), y)
    shuffled = list(batches(Split(x, y), 4, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert sorted(torch.cat([b[1] for b in shuffled]).tolist()) == list(range(10))


# =============================================================================
# bad input: exit code 2, one line, no traceback
# =============================================================================


def test_error_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    assert_cli_error(run_main(capsys, "eval", "--checkpoint", missing, "--data", TINY_DATA), "not found", str(missing))
    assert_cli_error(run_main(capsys, "profile", "--checkpoint", missing), "not found")


def test_error_truncated_checkpoint(tiny_checkpoint, tmp_path):
    blob = tiny_checkpoint.read_bytes()
    cut = tmp_path / "truncated.pt"
    cut.write_bytes(blob[: len(blob) // 2])
    assert_cli_error(run_cli("eval", "--checkpoint", cut, "--data", TINY_DATA), "not a readable checkpoint")


@pytest.mark.parametrize("content", [os.urandom(4096), b"this is a text file, not a checkpoint\n"],
                         ids=["random-bytes", "text"])
def test_error_not_a_checkpoint(tmp_path, capsys, content):
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    assert_cli_error(run_main(capsys, "profile", "--checkpoint", path, "--no-latency"), "not a readable checkpoint")


def test_error_checkpoint_without_state_dict(tmp_path, capsys):
    path = tmp_path / "other.pt"
    torch.save({"weights": [1, 2, 3]}, path)
    assert_cli_error(run_main(capsys, "profile", "--checkpoint", path, "--no-latency"), "no state dict")


@pytest.mark.parametrize("old,new", [
    ("backbone.bn3.running_mean", "backbone.bn3.running_avg"),
    ("backbone.conv0.weight", "backbone.conv_0.weight"),
])
def test_error_wrong_key_names(tiny_checkpoint, tmp_path, capsys, old, new):
    model, _ = load_checkpoint(tiny_checkpoint)
    sd = model.state_dict()
    sd = {new if k == old else k: v for k, v in sd.items()}
    path = tmp_path / "renamed.pt"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(AutopruneError, match=old.replace(".", r"\.")):
        load_checkpoint(path)
    assert_cli_error(run_main(capsys, "eval", "--checkpoint", path, "--data", TINY_DATA), repr(old))


def test_error_extra_key(tiny_checkpoint, tmp_path):
    model, _ = load_checkpoint(tiny_checkpoint)
    sd = {**model.state_dict(), "backbone.conv0.bias": torch.zeros(8)}
    path = tmp_path / "extra.pt"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(AutopruneError, match=r"unexpected key 'backbone\.conv0\.bias'"):
        load_checkpoint(path)


def test_error_wrong_shapes(tiny_checkpoint):
    line = assert_cli_error(
        run_cli("eval", "--checkpoint", tiny_checkpoint, "--data", TINY_DATA, "--width", "0.25"),
        "'backbone.conv0.weight'", "(8, 3, 3, 3)", "(16, 3, 3, 3)",
    )
    assert line.index("(8, 3, 3, 3)") < line.index("(16, 3, 3, 3)")  # checkpoint's, then model's


def test_error_unknown_data_spec(tiny_checkpoint, capsys):
    assert_cli_error(run_main(capsys, "eval", "--checkpoint", tiny_checkpoint, "--data", "imagenet"),
                     "unknown data spec", "'imagenet'")
    assert_cli_error(run_main(capsys, "eval", "--checkpoint", tiny_checkpoint, "--data", "synthetic:ten"),
                     "synthetic size")


def test_error_missing_npz(tiny_checkpoint, tmp_path, capsys):
    missing = tmp_path / "missing.npz"
    assert_cli_error(run_main(capsys, "eval", "--checkpoint", tiny_checkpoint, "--data", f"npz:{missing}"),
                     "data file not found", str(missing))


@pytest.mark.parametrize("width", ["0", "-1"])
def test_error_bad_width(tmp_path, capsys, width):
    assert_cli_error(run_main(capsys, "profile", "--width", width, "--no-latency"), "width must be > 0")
    out = tmp_path / "never.pt"
    assert_cli_error(run_main(capsys, "train", "--data", TINY_DATA, "--width", width, "--epochs", "1",
                              "--out", out), "width must be > 0")
    assert not out.exists()


def test_error_zero_epochs(tmp_path, capsys):
    out = tmp_path / "never.pt"
    assert_cli_error(run_main(capsys, "train", "--data", TINY_DATA, "--epochs", "0", "--out", out), "--epochs")
    assert not out.exists()


class Custom:
    """Not a tensor: a weights-only load must refuse a checkpoint that pickles this."""

    def __init__(self):
        self.value = 42


class RunsCode:
    """Unpickling this would create a directory: proof that code ran during the load."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_error_pickled_code_is_refused(tiny_checkpoint, tmp_path, capsys):
    model, _ = load_checkpoint(tiny_checkpoint)
    plain = tmp_path / "custom.pt"
    torch.save({"state_dict": model.state_dict(), "extra": Custom()}, plain)
    assert_cli_error(run_main(capsys, "eval", "--checkpoint", plain, "--data", TINY_DATA), "not weights-only")

    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": model.state_dict(), "payload": RunsCode(marker)}, evil)
    assert_cli_error(run_cli("profile", "--checkpoint", evil, "--no-latency"), "not a readable checkpoint")
    with pytest.raises(AutopruneError):
        load_checkpoint(evil)
    assert not marker.exists()


def test_dense_training_is_reproducible(tmp_path):
    """The same study config trains the same dense model: initial weights are seeded too."""
    import dataclasses

    from autoprune.config import StudyConfig
    from autoprune.prepare import dense_model

    weights = []
    for run in ("a", "b"):
        config = StudyConfig()
        config.study.out_dir = str(tmp_path / run / "reports" / "x")
        config.model = dataclasses.replace(config.model, width=0.0625, train_epochs=1)
        config.data = dataclasses.replace(config.data, spec="synthetic:200")
        data = config.load_data()
        model, _ = dense_model(config, data, "cpu", progress=False)
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
