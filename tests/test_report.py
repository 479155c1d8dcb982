"""Reading a study: report files, pick, export, and loading an export back.

Two tiny studies (fine-grained and channel, width 0.125 on synthetic:600, 3
trials of 1 fine-tune epoch, loose accuracy floors) are made once per module;
the fine-grained one gets a few fabricated trials (stopped early, low
fidelity, failed, a high-accuracy one without kept weights) to check that
pick and export never present a trial that was not fully fine-tuned.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

import autoprune
from autoprune.config import load_config
from autoprune.errors import AutopruneError, NothingQualifies
from autoprune.export import export, load_sparse
from autoprune.pick import is_deployable, pick
from autoprune.report import (kept_widths, layer_names, redacted_config, trials_frame, uniform_baseline,
                              write_report)
from autoprune.search import run_search
from autoprune.storage import redact
from autoprune.study import open_existing

from conftest import run_cli, run_main, write_study

pytestmark = pytest.mark.usefixtures("one_thread")


def study_toml(root: Path, checkpoint: Path, kind: str, cap: float, priors: bool, name=None, trials=3) -> Path:
    name = name or f"tiny-{kind}"
    return write_study(root / f"{name}.toml", study={"name": name, "kind": kind, "trials": trials,
                                                     "out_dir": root / "reports" / name},
                       model={"checkpoint": checkpoint}, constraints={"max_size_fraction": cap},
                       priors={"enabled": priors})


def make_study(root: Path, checkpoint: Path, kind: str, cap: float, priors: bool):
    config = load_config(study_toml(root, checkpoint, kind, cap, priors))
    run_search(config, progress=False)
    return config.storage_url, config.study.name


def fabricate(study: optuna.Study, like: optuna.trial.FrozenTrial, state=TrialState.COMPLETE, drop=(),
              constraints=None, **attrs) -> int:
    """Add a trial that looks like ``like`` with ``attrs`` changed; returns its number."""
    user_attrs = {k: v for k, v in like.user_attrs.items() if k not in drop}
    user_attrs.update(attrs)
    trial = optuna.trial.create_trial(
        state=state, values=like.values if state == TrialState.COMPLETE else None, params=like.params,
        distributions=like.distributions, user_attrs=user_attrs,
        constraints=(constraints if constraints is not None else like.constraints)
        if state == TrialState.COMPLETE else None)
    study.add_trial(trial)
    return study.get_trials(deepcopy=False)[-1].number


@pytest.fixture(scope="module")
def fine(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("fine")
    url, name = make_study(root, tiny_checkpoint, "fine_grained", 0.3, priors=True)
    study = optuna.load_study(study_name=name, storage=url)
    real = study.get_trials(states=(TrialState.COMPLETE,))
    like = real[0]
    acc = like.values[1]
    feasible = {"size": -0.01, "accuracy": -50.0}
    fake = {
        # Looks feasible and better than anything else, but was stopped early: never deployable.
        "stopped": fabricate(study, like, constraints=feasible, val_accuracy=99.0, stopped_early_at_epoch=1,
                             finetune_epochs_done=1),
        # A low-fidelity trial (multi-fidelity studies): not fully fine-tuned either.
        "low_fidelity": fabricate(study, like, constraints=feasible, val_accuracy=98.0, fidelity="low"),
        # Fewer fine-tune epochs than the recipe.
        "short": fabricate(study, like, constraints=feasible, val_accuracy=97.0, finetune_epochs_done=0),
        # Fully fine-tuned and the most accurate, but its weights were not kept.
        "no_weights": fabricate(study, like, drop=("weights_artifact_id",), constraints=feasible,
                                val_accuracy=acc + 20.0),
        "failed": fabricate(study, like, state=TrialState.FAIL),
    }
    return {"url": url, "name": name, "root": root, "fake": fake, "real": [t.number for t in real]}


@pytest.fixture(scope="module")
def channel(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("channel")
    url, name = make_study(root, tiny_checkpoint, "channel", 0.6, priors=False)
    return {"url": url, "name": name, "root": root}


@pytest.fixture(scope="module")
def fine_report(fine):
    out = fine["root"] / "report"
    return out, write_report(fine["url"], fine["name"], out)


# --- report ------------------------------------------------------------------------


def test_report_writes_every_file(fine, fine_report):
    out, written = fine_report
    for name in ("trials.csv", "pareto.png", "picked_layers.png", "sensitivity-fine_grained.png", "history.png",
                 "importances.png", "report.md", "report.html"):
        assert name in written and (out / name).stat().st_size > 0, name
    assert (out / "baseline-cache.json").is_file()
    import pandas as pd

    df = pd.read_csv(out / "trials.csv")
    study = optuna.load_study(study_name=fine["name"], storage=fine["url"])
    assert len(df) == len(study.trials)  # every trial, every state
    assert {"FAIL", "COMPLETE"} <= set(df["state"])
    assert {"plan_conv0", "plan_classifier", "size_fraction", "val_accuracy", "test_accuracy", "feasible",
            "stopped_early", "deployable"} <= set(df.columns)
    stopped = df.set_index("number").loc[fine["fake"]["stopped"]]
    assert bool(stopped["stopped_early"]) and not bool(stopped["deployable"])

    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 5
    sources = re.findall(r"<img[^>]*src='([^']*)'", page)
    assert len(sources) >= 5 and all(s.startswith("data:image/png;base64,") for s in sources)  # all embedded
    md = (out / "report.md").read_text()
    for text in ("Best feasible config", "Pareto front", "Uniform baseline", "reported only", "carved from the training"):
        assert text in md, text
    # The baseline is cached: a second computation reads it back.
    study, config = open_existing(fine["url"], fine["name"])
    again = uniform_baseline(study, config, out)
    assert again["from_cache"] and again["plan"]["kind"] == "fine_grained"
    assert again["size_fraction"] == pytest.approx(config.constraints.max_size_fraction, abs=1e-4)


def test_channel_report_has_macs_and_latency_figures(channel):
    out = channel["root"] / "report"
    written = write_report(channel["url"], channel["name"], out, baseline=False)
    for name in ("pareto.png", "accuracy_vs_macs.png", "accuracy_vs_latency.png", "picked_layers.png",
                 "report.html"):
        assert name in written and (out / name).stat().st_size > 0, name
    assert "skipped (--no-baseline)" in (out / "report.md").read_text()


def test_report_never_shows_a_password(fine, tmp_path):
    secret = "s3cret-pw"
    url = f"postgresql://alice:{secret}@db.example:5432/studies"
    assert secret not in redact(url) and "alice" in redact(url) and "db.example" in redact(url)
    # A copy of the study whose config names a storage with a password.
    db = Path(fine["url"][len("sqlite:///"):])
    copy = tmp_path / "copy.db"
    shutil.copyfile(db, copy)
    study = optuna.load_study(study_name=fine["name"], storage=f"sqlite:///{copy}")
    cfg = study.user_attrs["config"]
    cfg["study"]["storage"] = url
    study.set_user_attr("config", cfg)
    _, config = open_existing(f"sqlite:///{copy}", fine["name"])
    assert redacted_config(config)["study"]["storage"] == redact(url)
    out = tmp_path / "report"
    write_report(f"sqlite:///{copy}", fine["name"], out, baseline=False)
    for path in out.iterdir():
        if path.suffix in (".md", ".html", ".csv", ".json"):
            assert secret not in path.read_text(), path.name
    assert redact(url) in (out / "report.md").read_text()


# --- pick ----------------------------------------------------------------------------


def test_pick_highest_accuracy_deployable_trial(fine, capsys):
    study, config = open_existing(fine["url"], fine["name"])
    fake = fine["fake"]
    best, runners = pick(study, config)
    assert best.number == fake["no_weights"]  # most accurate of the fully fine-tuned trials
    assert all(is_deployable(t, config) for t in [best, *runners])
    never = {fake["stopped"], fake["low_fidelity"], fake["short"], fake["failed"]}
    assert not never & {t.number for t in [best, *runners]}
    # Export needs kept weights: then the best real trial, by accuracy, ties by size.
    best_w, _ = pick(study, config, require_weights=True)
    real = [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if t.number in fine["real"]]
    expected = min(real, key=lambda t: (-t.user_attrs["val_accuracy"], t.user_attrs["size_fraction"], t.number))
    assert best_w.number == expected.number
    smallest, _ = pick(study, config, prefer="size")
    assert smallest.user_attrs["size_fraction"] == min(t.user_attrs["size_fraction"] for t in [best, *runners, *real])

    result = run_main(capsys, "pick", "--storage", fine["url"], "--study", fine["name"], "--json", "-q")
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert got["trial"] == fake["no_weights"] and not got["has_weights"]
    for key in ("plan", "size_fraction", "val_accuracy", "test_accuracy", "macs_fraction", "runners_up"):
        assert key in got, key
    assert fake["stopped"] not in [r["trial"] for r in got["runners_up"]]


def test_pick_with_impossible_limits_names_the_closest_trial(fine):
    study, config = open_existing(fine["url"], fine["name"])
    with pytest.raises(NothingQualifies, match="closest: trial"):
        pick(study, config, max_size=0.01, min_accuracy=100.0)
    result = run_cli("pick", "--storage", fine["url"], "--study", fine["name"], "--max-size", "0.01",
                     "--min-accuracy", "100")
    assert result.returncode == 1, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("autoprune: error: no deployable trial") and "closest: trial" in line
    closest = int(line.split("closest: trial ")[1].split()[0])
    assert closest not in (fine["fake"]["stopped"], fine["fake"]["low_fidelity"], fine["fake"]["failed"])
    assert "Traceback" not in result.stderr


# --- export ----------------------------------------------------------------------------


def _artifact_model(study, trial):
    from optuna.artifacts import FileSystemArtifactStore, download_artifact

    from autoprune.model import build_model

    path = Path(study.user_attrs["artifact_dir"]).parent / f"check-{trial.number}.pt"
    path.unlink(missing_ok=True)
    download_artifact(artifact_store=FileSystemArtifactStore(study.user_attrs["artifact_dir"]), file_path=str(path),
                      artifact_id=trial.user_attrs["weights_artifact_id"])
    obj = torch.load(path, weights_only=True)
    path.unlink()
    model = build_model("vgg", channels=obj["autoprune"]["arch"]["channels"])
    model.load_state_dict(obj["state_dict"])
    return model.eval()


def test_export_fine_grained_reproduces_the_trial(fine, tmp_path, capsys):
    study, config = open_existing(fine["url"], fine["name"])
    trial, _ = pick(study, config, require_weights=True)
    out = tmp_path / "export"
    result = export(fine["url"], fine["name"], out, trial=trial.number)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.pt", "plan.json", "sparse.npz"]
    assert result["sparse_bytes"] < 0.6 * result["dense_bytes"]  # 30% nonzeros: the file shows it
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sparse_bytes"] == (out / "sparse.npz").stat().st_size
    assert json.loads((out / "plan.json").read_text())["ratios"] == pytest.approx(trial.user_attrs["plan"])

    ev = run_main(capsys, "eval", "--checkpoint", out, "--data", "synthetic:600", "--json", "-q")
    assert ev.returncode == 0, ev.stderr
    got = json.loads(ev.stdout)
    assert abs(got["accuracy"] - trial.user_attrs["test_accuracy"]) <= 0.01
    assert got["nonzero_params"] / study.user_attrs["dense"]["params"] == trial.user_attrs["size_fraction"]

    model = autoprune.load(out)
    assert not model.training
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x), _artifact_model(study, trial)(x))
    sparse = load_sparse(out / "sparse.npz")
    for key, value in model.state_dict().items():
        assert torch.equal(sparse[key], value), key


def test_export_channel_is_the_small_network(channel, tmp_path):
    from autoprune import metrics

    study, config = open_existing(channel["url"], channel["name"])
    out = tmp_path / "export"
    exported = export(channel["url"], channel["name"], out, pick_kwargs={})  # what `export --pick` does
    trial = study.trials[exported["trial"]]
    assert trial.number == pick(study, config, require_weights=True)[0].number
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.onnx", "model.pt", "model.ts",
                                                     "plan.json"]
    model = autoprune.load(out)
    assert metrics.count_params(model) == trial.user_attrs["params"]
    assert metrics.count_macs(model) == trial.user_attrs["macs"]
    assert list(model.channels) == trial.user_attrs["channels"]

    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch; m = torch.jit.load(sys.argv[1]); "
            "torch.save(m(torch.load(sys.argv[2])).detach(), sys.argv[3])")
    run = subprocess.run([sys.executable, "-c", code, str(out / "model.ts"), str(tmp_path / "x.pt"),
                          str(tmp_path / "y.pt")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    with torch.no_grad():
        assert (torch.load(tmp_path / "y.pt") - model(x)).abs().max().item() <= 1e-6
    # model.onnx: ONNX Runtime's outputs equal torch's to 1e-4, and metrics.json says it was checked.
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert abs(session.run(None, {"input": x.numpy()})[0] - model(x).numpy()).max() <= 1e-4
    onnx = json.loads((out / "metrics.json").read_text())["onnx"]
    assert onnx["written"] and onnx["max_abs_difference"] <= onnx["tolerance"] == 1e-4


def test_export_refuses_a_non_empty_dir_and_leaves_it_alone(fine, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_bytes(b"precious")
    trial = fine["real"][0]
    result = run_cli("export", "--storage", fine["url"], "--study", fine["name"], "--trial", trial, "--out", out)
    assert result.returncode == 2 and "--force" in result.stderr.strip().splitlines()[-1], result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_bytes() == b"precious"
    # --force replaces only an earlier export, never a user's files.
    with pytest.raises(AutopruneError, match="holds keep.txt"):
        export(fine["url"], fine["name"], out, trial=trial, force=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_bytes() == b"precious"
    # A finished export is not overwritten either; with force it is replaced.
    done = tmp_path / "done"
    export(fine["url"], fine["name"], done, trial=trial)
    before = {p.name: p.read_bytes() for p in done.iterdir()}
    with pytest.raises(AutopruneError, match="not empty"):
        export(fine["url"], fine["name"], done, trial=trial)
    assert {p.name: p.read_bytes() for p in done.iterdir()} == before
    export(fine["url"], fine["name"], done, trial=trial, force=True)
    assert sorted(p.name for p in done.iterdir()) == sorted(before)  # no staging left behind
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_export_errors_are_one_line(fine, tmp_path):
    fake = fine["fake"]
    cases = [
        (["--trial", fake["failed"]], [f"trial {fake['failed']}", "did not finish", "FAIL"]),
        (["--trial", fake["stopped"]], [f"trial {fake['stopped']}", "stopped early"]),
        (["--trial", fake["low_fidelity"]], [f"trial {fake['low_fidelity']}", "fidelity"]),
        (["--trial", fake["no_weights"]], [f"trial {fake['no_weights']}", "kept no weights"]),
        (["--trial", 999], ["no trial 999"]),
    ]
    for args, fragments in cases:
        with pytest.raises(AutopruneError) as info:
            export(fine["url"], fine["name"], tmp_path / "x", trial=args[1])
        for fragment in fragments:
            assert fragment in str(info.value), (fragment, str(info.value))
        assert "\n" not in str(info.value)
    assert not (tmp_path / "x").exists()
    with pytest.raises(AutopruneError, match="no study named 'nope'.*" + fine["name"]):
        export(fine["url"], "nope", tmp_path / "x", trial=0)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(AutopruneError, match="cannot write"):
        export(fine["url"], fine["name"], blocker / "sub", trial=fine["real"][0])
    result = run_cli("export", "--storage", fine["url"], "--study", "nope", "--trial", 0, "--out", tmp_path / "y")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("autoprune: error: no study named 'nope'") and "Traceback" not in result.stderr


# --- trials of any model ---------------------------------------------------------------------------


def test_trials_of_a_graph_model_are_tabled_by_their_group_names_and_widths():
    from autoprune.config import StudyConfig

    config = StudyConfig()
    config.study.kind = "channel"
    study = optuna.create_study(directions=["maximize"])
    for plan, widths in [({"stem.0": 0.5, "down": 0.25}, {"stem.0": 4, "block.conv1": 8, "down": 12}),
                         ({"block.conv1": 0.125}, {"stem.0": 8, "block.conv1": 7, "down": 16})]:
        study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, values=[50.0],
                                                  user_attrs={"plan": plan, "widths": widths}))
    assert layer_names(study, config) == ("stem.0", "down", "block.conv1")  # as first seen (no cost model given)
    df = trials_frame(study, config)
    assert list(df["plan_stem.0"]) == [0.5, 0.0] and list(df["plan_block.conv1"]) == [0.0, 0.125]
    assert list(df["widths"]) == ["stem.0=4;block.conv1=8;down=12", "stem.0=8;block.conv1=7;down=16"]
    assert "plan_conv0" not in df and df["channels"].isna().all()
    # the lab's VGG keeps its columns: every conv, and its channels as before
    vgg = optuna.create_study(directions=["maximize"])
    vgg.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, values=[50.0], user_attrs={
        "plan": {"conv3": 0.5}, "channels": [8, 16, 32, 16, 64, 64, 64, 64]}))
    assert layer_names(vgg, config) == ("conv0", "conv1", "conv2", "conv3", "conv4", "conv5", "conv6")
    frame = trials_frame(vgg, config)
    assert list(frame["channels"]) == ["8-16-32-16-64-64-64-64"] and "widths" not in frame


def test_kept_widths_read_widths_or_the_vggs_channels():
    groups = ("conv0", "conv1", "conv2", "conv3", "conv4", "conv5", "conv6")
    assert kept_widths({"channels": [3, 5, 10, 10, 21, 21, 21, 32]}, groups) == dict(
        zip(groups, [3, 5, 10, 10, 21, 21, 21]))
    assert kept_widths({"widths": {"stem.0": 4, "down": 9}, "channels": [1]}, ["stem.0", "down"]) == {
        "stem.0": 4, "down": 9}
    assert kept_widths({"plan": {}}, groups) is None
