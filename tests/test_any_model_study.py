"""Studies over models other than the lab's VGG: search -> pick -> export -> autoprune.load, end to end.

A CIFAR ResNet (residual adds), a MobileNetV2 (depthwise convs, torchvision) and
a user model defined in tests/test_models.py (``module:`` source) each run a tiny
channel study; the ResNet a fine-grained one too. The export of the pick reloads
with one call and gives the validation accuracy the trial recorded.
"""

from __future__ import annotations

import pytest
import torch

import autoprune
from autoprune.config import load_config
from autoprune.errors import AutopruneError
from autoprune.export import export
from autoprune.prepare import check_setup
from autoprune.search import run_search
from autoprune.train import evaluate
from conftest import write_study

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")]

USER = "module:test_models:small_net"
MODELS = {  # [model] tables: small enough for seconds per trial on synthetic data
    "resnet": {"source": "cifar:resnet20", "width": 0.25},
    "mobilenet": {"source": "torchvision:mobilenet_v2", "cifar_stem": True, "kwargs": "{ width_mult = 0.25 }"},
    "user": {"source": USER, "kwargs": "{ width = 8 }"},
}
# MobileNetV2's 17 blocks make its scan and its latency table the slowest parts: its groups' scan is
# test_models', the predictor over graph models the ResNet's and the user model's
PRIORS = {"mobilenet": {"enabled": False}}
LATENCY = {"mobilenet": {"predict": False}}
FAST = {"latency": {"repeats": 3, "warmup": 1}, "select": {"top_k": 0}}


def study_config(tmp_path, name: str, kind: str = "channel", **tables):
    model = {k: v for k, v in MODELS[name].items() if k != "kwargs"}
    lines = "\n".join(f"{k} = {v}" for k, v in [("kwargs", MODELS[name].get("kwargs"))] if v)
    path = write_study(tmp_path / f"{name}.toml", study={"name": f"{name}-{kind}", "kind": kind, "trials": 2,
                                                           "seed": 0},
                       model={**model, "width": model.get("width", 1.0), "train_epochs": 1},
                       constraints={"max_size_fraction": 0.6, "max_accuracy_drop": 100.0},
                       data={"spec": "synthetic:300"}, priors={"grid": [0.5] if kind == "channel" else [0.5, 0.9], **PRIORS.get(name, {})},
                       **{**FAST, "latency": {**FAST["latency"], **LATENCY.get(name, {})}, **tables})
    if lines:  # an inline table: write_study writes plain values
        path.write_text(path.read_text().replace("[model]\n", f"[model]\n{lines}\n"))
    return load_config(path, out_dir=str(tmp_path / name))


@pytest.mark.parametrize("name, kind", [("resnet", "channel"), ("mobilenet", "channel"), ("user", "channel"),
                                        ("resnet", "fine_grained")])
def test_a_study_on_another_model_exports_its_pick_and_loads_to_the_recorded_accuracy(tmp_path, name, kind):
    config = study_config(tmp_path, name, kind)
    summary = run_search(config, device="cpu", progress=False)
    assert summary["finished_trials"] == 2
    out = tmp_path / "export"
    result = export(config.storage_url, config.study.name, out, pick_kwargs={})
    source = USER if name == "user" else None
    model = autoprune.load(out, source=source)
    data = config.load_data()
    assert evaluate(model, data.val) == pytest.approx(result["val_accuracy"], abs=1e-9)
    dense = autoprune.build_model(config.model.source, 10, **config.model.build_kwargs())
    n_params = sum(p.numel() for p in model.parameters())
    if kind == "channel":  # physically smaller, its widths recorded; TorchScript reproduces it
        assert result["widths"] and n_params < sum(p.numel() for p in dense.parameters())
        assert n_params == result["measured"]["params"]
        x = torch.randn(2, 3, 32, 32)
        scripted = torch.jit.load(str(out / "model.ts"))
        torch.testing.assert_close(scripted(x), model(x))
    else:  # dense-shaped with the zeros: the size the trial recorded
        assert result["measured"]["nonzero_params"] / result["dense"]["params"] == pytest.approx(
            result["size_fraction"])
        assert result["size_fraction"] <= 0.6


def test_a_checkpoint_of_another_source_is_refused_with_the_fix(tmp_path):
    other = autoprune.build_model("cifar:resnet20", 10, width=0.5)
    ckpt = autoprune.save_checkpoint(other, tmp_path / "dense.pt")
    config = study_config(tmp_path, "user")
    config.model.checkpoint = str(ckpt)
    with pytest.raises(AutopruneError) as exc:
        check_setup(config)
    assert str(exc.value) == (f"checkpoint {ckpt} holds a cifar:resnet20 model, but the study asks for {USER}; set "
                              "[model] source to match or use another checkpoint")


def test_a_bare_state_dict_is_the_dense_model_its_config_describes(tmp_path):
    config = study_config(tmp_path, "resnet")
    model = autoprune.build_model("cifar:resnet20", 10, width=0.25)
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    config.model.checkpoint = str(tmp_path / "bare.pt")
    assert "checkpoint" in check_setup(config)["dense"]
    config.model.width = 0.5
    with pytest.raises(AutopruneError, match=r"^checkpoint .*bare.pt does not fit \[model\] source cifar:resnet20 "
                                             r"as configured: checkpoint key 'conv1.weight' has shape \(4, 3, 3, 3\), "
                                             r"model expects \(8, 3, 3, 3\); fix \[model\]"):
        check_setup(config)


@pytest.mark.parametrize("model, message", [
    ({"source": "cifar:resnet20", "cifar_stem": True},
     "[model] cifar_stem adapts torchvision models to 32x32 inputs; cifar:resnet20 needs none: drop it"),
    ({"source": "vgg", "exclude": ["conv0"]},
     "[model] kwargs and exclude are for other sources; the lab's VGG takes width"),
    ({"source": "resnet18"}, "unknown model source 'resnet18'; use vgg, torchvision:NAME, cifar:resnet20 or "
                             "module:package.module:factory"),
    ({"source": "cifar:resnet21"}, "unknown CIFAR model 'resnet21'; use one of resnet20, resnet32, resnet44, "
                                   "resnet56, resnet110"),
])
def test_bad_model_tables_name_the_fix(tmp_path, model, message):
    path = write_study(tmp_path / "bad.toml", model={**model, "train_epochs": 1})
    with pytest.raises(AutopruneError) as exc:
        check_setup(load_config(path, out_dir=str(tmp_path / "bad")))
    assert str(exc.value) == message


def test_a_worker_joins_a_user_model_study_from_what_the_study_holds(tmp_path):
    """The arch and the dense checkpoint travel in the study: a worker on a machine without the file rebuilds
    the user's model (its module: source named by the study's config) and runs trials on it."""
    from pathlib import Path

    from autoprune.search import run_worker
    from autoprune.study import open_existing

    config = study_config(tmp_path, "user")
    config.study.trials = 1
    run_search(config, device="cpu", progress=False)
    study, _ = open_existing(config.storage_url, config.study.name)
    Path(study.user_attrs["checkpoint"]).unlink()  # not on this "machine": fetched from the artifact store
    run_worker(config.storage_url, config.study.name, device="cpu", trials=2, progress=False)
    study, _ = open_existing(config.storage_url, config.study.name)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 2
    assert all(set(t.user_attrs["widths"]) <= set(autoprune.prunable(autoprune.build_model(
        USER, 10, width=8)).channel_groups()) for t in done)


def test_eval_and_sensitivity_import_a_user_models_code_only_when_named(tmp_path, capsys):
    from conftest import assert_cli_error, run_main

    ckpt = autoprune.save_checkpoint(autoprune.build_model(USER, 10, width=4), tmp_path / "user.pt")
    data = ["--data", "synthetic:50"]
    assert_cli_error(run_main(capsys, "eval", "--checkpoint", ckpt, *data),
                     f"this checkpoint's model comes from user code ({USER}); autoprune imports it only when you "
                     f"name it")
    assert run_main(capsys, "eval", "--checkpoint", ckpt, "--source", USER, *data).returncode == 0
    result = run_main(capsys, "sensitivity", "--checkpoint", ckpt, "--source", USER, "--kind", "channel",
                      "--grid", "0.5", "--out", tmp_path / "scan", "--quiet", *data)
    assert result.returncode == 0, result.stderr
    groups = autoprune.prunable(autoprune.build_model(USER, 10, width=4)).channel_groups()
    assert [line.split()[0] for line in result.stdout.splitlines()[2:2 + len(groups)]] == list(groups)
