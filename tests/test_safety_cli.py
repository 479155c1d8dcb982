"""Bad flags and bad study TOMLs: one line ``autoprune: error: ...``, exit 2, nothing written.

Most cases run the CLI in this process (:func:`run_main`); a few run the real
process. No GPU is needed: CUDA's absence (or count) is monkeypatched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from autoprune.cli import main
from autoprune.config import StudyConfig, load_config
from autoprune.errors import AutopruneError

from conftest import TINY_DATA, TINY_WIDTH, run_cli
from conftest import assert_cli_error, run_main, write_study


def write_toml(folder: Path, name: str = "study.toml", **tables: str) -> Path:
    """The tiny study (conftest.TINY_STUDY) in ``folder``; ``tables`` sets keys: study='trials = "5"\nseed = 1'."""
    return write_study(folder / name, **tables)


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


# --- flags ---------------------------------------------------------------------

FLAG_CASES = [
    (["profile", "--width", "inf"], "--width must be > 0 (a finite number), got 'inf'"),
    (["profile", "--width", "nan"], "--width must be > 0 (a finite number), got 'nan'"),
    (["profile", "--width", "wide"], "--width must be > 0 (a finite number), got 'wide'"),
    (["train", "--data", TINY_DATA, "--width", "inf"], "--width must be > 0 (a finite number)"),
    (["eval", "--checkpoint", "x.pt", "--data", TINY_DATA, "--width", "inf"], "--width must be > 0 (a finite number)"),
    (["profile", "--threads", "-1"], "--threads must be >= 1 (an integer), got '-1'"),
    (["profile", "--threads", "0"], "--threads must be >= 1 (an integer), got '0'"),
    (["train", "--data", TINY_DATA, "--data-seed", "-1"], "--data-seed must be an integer in [0, 4294967295], got '-1'"),
    (["eval", "--checkpoint", "x.pt", "--data", TINY_DATA, "--data-seed", "-1"],
     "--data-seed must be an integer in [0, 4294967295]"),
    (["sensitivity", "--checkpoint", "x.pt", "--data", TINY_DATA, "--data-seed", "-1"],
     "--data-seed must be an integer in [0, 4294967295]"),
    (["train", "--data", TINY_DATA, "--val-size", "0"], "--val-size must be >= 1 (an integer), got '0'"),
    (["train", "--data", TINY_DATA, "--val-size", "-5"], "--val-size must be >= 1 (an integer), got '-5'"),
    (["profile", "--repeats", "0"], "--repeats must be >= 1 (an integer), got '0'"),
    (["profile", "--batch-size", "-1"], "--batch-size must be in [1, 4096] (one batch size, or several "
                                        "comma-separated: 1,8), got '-1'"),
    (["profile", "--batch-size", "1,0"], "--batch-size must be in [1, 4096] (one batch size, or several "
                                         "comma-separated: 1,8), got '0'"),
    (["profile", "--threads", "0"], "--threads must be >= 1 (an integer), got '0'"),
    (["train", "--data", TINY_DATA, "--weight-decay", "-1"], "--weight-decay must be >= 0 (a finite number), got '-1'"),
    (["train", "--data", TINY_DATA, "--lr", "inf"], "--lr must be > 0 (a finite number), got 'inf'"),
    (["train", "--data", TINY_DATA, "--lr", "nan"], "--lr must be > 0 (a finite number), got 'nan'"),
    (["train", "--data", TINY_DATA, "--epochs", "0"], "--epochs must be >= 1 (an integer), got '0'"),
    (["train", "--data", TINY_DATA, "--epochs", "1.5"], "--epochs must be >= 1 (an integer), got '1.5'"),
    (["train", "--data", TINY_DATA, "--seed", "-1"], "--seed must be an integer in [0, 4294967295]"),
    (["train", "--data", TINY_DATA, "--batch-size", "0"], "--batch-size must be >= 1 (an integer)"),
    (["search", "missing.toml", "--trials", "0"], "--trials must be >= 1 (an integer)"),  # checked before the file
    (["search", "missing.toml", "--seed", "-1"], "--seed must be an integer in [0, 4294967295]"),
    (["search", "missing.toml", "--seed", "5000000000"], "--seed must be an integer in [0, 4294967295], got '5000000000'"),
    (["train", "--data", "synthetic:1000000000000", "--out", "x.pt"],
     "synthetic size must be an integer from 50 to 60000, got '1000000000000'"),
    (["worker", "--storage", "sqlite:///x.db", "--study", "s", "--trials", "0"], "--trials must be >= 1 (an integer)"),
    (["export", "--storage", "sqlite:///x.db", "--study", "s", "--trial", "-1", "--out", "o"],
     "--trial must be >= 0 (an integer), got '-1'"),
    (["pick", "--storage", "sqlite:///x.db", "--study", "s", "--max-size", "nan"],
     "--max-size must be a finite number, got 'nan'"),
]


@pytest.mark.parametrize("args, message", FLAG_CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in FLAG_CASES])
def test_bad_flag_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)  # relative outputs (x.db, o, reports/) would land here
    if args[0] == "train":
        args = [*args, "--out", "never.pt"]
    assert_cli_error(run_main(capsys, *args), message)
    assert files_under(tmp_path) == set()


def test_bad_flag_in_the_real_process(tmp_path):
    result = run_cli("train", "--data", TINY_DATA, "--width", "inf", "--out", tmp_path / "never.pt")
    assert_cli_error(result, "--width must be > 0 (a finite number), got 'inf'")
    assert not (tmp_path / "never.pt").exists()


def test_argparse_errors_are_one_line_with_a_pointer_to_help(capsys):
    line = assert_cli_error(run_main(capsys, "train", "--data", TINY_DATA), "required: --out")
    assert line.endswith("; see autoprune train --help"), line
    assert_cli_error(run_main(capsys, "eval", "--checkpoint", "x", "--data", TINY_DATA, "--split", "dev"),
                     "--split: invalid choice: 'dev'", "see autoprune eval --help")
    assert_cli_error(run_main(capsys, "potato"), "invalid choice: 'potato'", "see autoprune --help")
    assert_cli_error(run_main(capsys), "required: COMMAND", "see autoprune --help")
    assert_cli_error(run_main(capsys, "profile", "--bogus"), "unrecognized arguments: --bogus")
    assert_cli_error(run_main(capsys, "export", "--storage", "x", "--study", "s", "--trial", "1", "--pick",
                              "--out", "o"), "--pick: not allowed with argument --trial")


def test_help_still_works(capsys):
    with pytest.raises(SystemExit) as info:
        main(["profile", "--help"])
    assert info.value.code == 0
    assert "--repeats" in capsys.readouterr().out


# --- devices -------------------------------------------------------------------


@pytest.mark.parametrize("device, gpus, message", [
    ("cuda", 0, "device 'cuda' asked for, but torch finds no CUDA GPU here"),
    ("cuda:0", 0, "no CUDA GPU"),
    ("cuda:1", 1, "torch finds 1 CUDA GPU(s) (cuda:0 to cuda:0)"),
    ("potato", 1, "unknown device 'potato'; use auto, cpu, cuda or cuda:N"),
    ("mps", 0, "unknown device 'mps'"),
])
def test_unusable_device_is_refused_before_any_work(tmp_path, monkeypatch, capsys, device, gpus, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    out = tmp_path / "never.pt"
    assert_cli_error(run_main(capsys, "train", "--data", TINY_DATA, "--epochs", "1", "--width", TINY_WIDTH,
                              "--device", device, "--out", out), message)
    assert not out.exists()
    # search: refused before the storage is created
    db = tmp_path / "db" / "study.db"
    path = write_toml(tmp_path / "conf", study=f'storage = "sqlite:///{db}"\nout_dir = "{tmp_path / "out"}"')
    assert_cli_error(run_main(capsys, "search", path, "--device", device), message)
    assert not db.parent.exists() and not (tmp_path / "out").exists()


def test_cpu_device_still_works(monkeypatch):
    from autoprune.train import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")


# --- output paths where a directory (or a file) is needed -------------------------


def test_file_where_a_directory_is_needed(tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    before = files_under(tmp_path)
    assert_cli_error(run_main(capsys, "sensitivity", "--checkpoint", "x.pt", "--data", TINY_DATA,
                              "--out", file), f"--out must be a directory, but {file} is a file")
    assert_cli_error(run_main(capsys, "profile", "--width", TINY_WIDTH, "--no-latency", "--plots", file),
                     f"--plots must be a directory, but {file} is a file")
    assert_cli_error(run_main(capsys, "profile", "--width", TINY_WIDTH, "--no-latency", "--plots", file / "sub"),
                     f"--plots must be a directory, but {file} is a file")
    assert_cli_error(run_main(capsys, "demo", "--out", file), "--out must be a directory")
    assert_cli_error(run_main(capsys, "train", "--data", TINY_DATA, "--out", tmp_path),
                     f"--out must be a file path, but {tmp_path} is a directory")
    assert_cli_error(run_main(capsys, "train", "--data", TINY_DATA, "--out", file / "m.pt"),
                     f"--out must be in a directory, but {file} is a file")
    assert files_under(tmp_path) == before
    assert file.read_text() == "keep me"


# --- TOML values of the wrong type -------------------------------------------------


@pytest.mark.parametrize("table, line, message", [
    ("study", 'trials = "5"', '[study] trials must be an integer, got "5" (a string) in '),
    ("study", "trials = true", "[study] trials must be an integer, got true (a boolean)"),
    ("study", "trials = 2.0", "[study] trials must be an integer, got 2.0 (a float)"),
    ("study", "seed = [1]", "[study] seed must be an integer, got [1] (an array)"),
    ("model", 'width = "0.25"', '[model] width must be a finite number, got "0.25" (a string)'),
    ("model", "width = inf", "[model] width must be a finite number, got inf (not finite)"),
    ("data", 'download = "yes"', '[data] download must be true or false, got "yes" (a string)'),
    ("data", "spec = 5", "[data] spec must be a string, got 5 (an integer)"),
    ("priors", 'grid = [0.5, "x"]', '[priors] grid must be a list of finite numbers, got [0.5, "x"] ("x" is a string)'),
    ("priors", "grid = [0.5, nan]",
     "[priors] grid must be a list of finite numbers, got [0.5, nan] (nan is not finite)"),
    ("priors", 'warm_start = "lamp"', '[priors] warm_start must be a list of strings, got "lamp" (a string)'),
    ("priors", "warm_start = [1]", "[priors] warm_start must be a list of strings, got [1] (1 is an integer)"),
    ("study", "objectives = \"size\"", '[study] objectives must be a list of strings, got "size" (a string)'),
    ("finetune", "lr = nan", "[finetune] lr must be a finite number, got nan (not finite)"),
    ("finetune", "early_stop = 1", "[finetune] early_stop must be true or false, got 1 (an integer)"),
    ("fidelity", "warmup_trials = false", "[fidelity] warmup_trials must be an integer, got false (a boolean)"),
])
def test_toml_value_of_the_wrong_type(tmp_path, table, line, message):
    path = write_toml(tmp_path, **{table: line})
    with pytest.raises(AutopruneError) as info:
        load_config(path)
    assert message in str(info.value) and str(info.value).endswith(f" in {path}"), str(info.value)


def test_toml_constraint_none_or_number(tmp_path):
    path = write_toml(tmp_path, constraints='max_accuracy_drop = "3"')
    with pytest.raises(AutopruneError, match=r'\[constraints\] max_accuracy_drop must be a finite number, got "3"'):
        load_config(path)
    path = write_toml(tmp_path, constraints="max_accuracy_drop = 3")
    assert load_config(path).constraints.max_accuracy_drop == 3  # an integer is a fine float


def test_wrong_type_via_the_cli_is_one_line(tmp_path, capsys):
    path = write_toml(tmp_path / "conf", study=f'out_dir = "{tmp_path / "out"}"', model='width = "0.25"')
    assert_cli_error(run_main(capsys, "search", path), '[model] width must be a finite number, got "0.25"')
    assert not (tmp_path / "out").exists()


def test_stored_config_types_are_checked_and_round_trip():
    good = load_config(Path(__file__).parents[1] / "studies" / "demo.toml")
    assert StudyConfig.from_dict(good.to_dict()).to_dict() == good.to_dict()
    stored = good.to_dict()
    stored["finetune"]["momentum"] = "0.9"
    with pytest.raises(AutopruneError, match=r"\[finetune\] momentum must be a finite number, got \"0.9\" "
                                             r"\(a string\) in the study's stored config"):
        StudyConfig.from_dict(stored)
    with pytest.raises(AutopruneError, match=r"\[priors\] in the study's stored config must be a table"):
        StudyConfig.from_dict({"priors": [1]})


# --- every number checked up front -------------------------------------------------


@pytest.mark.parametrize("table, line, message", [
    ("finetune", "momentum = -1", "[finetune] momentum must be in [0, 1), got -1"),
    ("finetune", "momentum = 1.0", "[finetune] momentum must be in [0, 1), got 1.0"),
    ("finetune", "weight_decay = -1e-4", "[finetune] weight_decay must be >= 0, got -0.0001"),
    ("finetune", "lr = 0", "[finetune] lr must be > 0, got 0"),
    ("finetune", "early_stop_margin = -1", "[finetune] early_stop_margin must be >= 0 points, got -1"),
    ("priors", "tolerance = -0.5", "[priors] tolerance must be >= 0 points, got -0.5"),
    ("study", "heartbeat_seconds = 0", "[study] heartbeat_seconds must be >= 1, got 0"),
    ("study", "seed = -1", "[study] seed must be in [0, 4294967295], got -1"),
    ("study", "seed = 99999999999999999999", "[study] seed must be in [0, 4294967295], got 99999999999999999999"),
    ("study", "trials = 0", "[study] trials must be >= 1, got 0"),
    ("model", "num_classes = 1", "[model] num_classes must be >= 2, got 1"),
    ("model", "train_epochs = 0", "[model] train_epochs must be >= 1, got 0"),
    ("data", "val_size = -1", "[data] val_size must be >= 0 (0: the default), got -1"),
    ("data", "seed = -3", "[data] seed must be in [0, 4294967295], got -3"),
    ("data", "seed = 4294967296", "[data] seed must be in [0, 4294967295], got 4294967296"),
    ("fidelity", "bn_recal_batch_size = 0", "[fidelity] bn_recal_batch_size must be >= 1, got 0"),
    ("fidelity", "promote_top = 0", "[fidelity] promote_top must be a fraction in (0, 1], got 0"),
])
def test_numbers_are_checked_when_the_config_loads(tmp_path, table, line, message):
    path = write_toml(tmp_path, **{table: line})
    with pytest.raises(AutopruneError) as info:
        load_config(path)
    assert message in str(info.value), str(info.value)


def test_bad_momentum_stops_search_before_dense_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = write_toml(tmp_path / "conf", finetune="momentum = -1")
    assert_cli_error(run_main(capsys, "search", path), "[finetune] momentum must be in [0, 1), got -1")
    assert not (tmp_path / "reports").exists()  # no dense checkpoint, scan cache or study.db


# --- study names -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["", ".hidden", "..", "a/b", "../escape", "a b", "x" * 101, "tab\there", "naïve"])
def test_unsafe_study_names_are_refused(tmp_path, name):
    path = write_toml(tmp_path, study=f"name = {json.dumps(name)}")
    for config in (lambda: load_config(path), lambda: load_config(write_toml(tmp_path, "ok.toml"), name=name)):
        with pytest.raises(AutopruneError) as info:
            config()
        message = str(info.value)
        assert message.startswith(f"study name {name!r} cannot be a folder name: use 1 to 100 letters, digits, "
                                  f"'.', '_' or '-', not starting with '.'"), message


@pytest.mark.parametrize("name", ["a", "x" * 100, "subset-fine_grained.v2", "2024"])
def test_safe_study_names_are_kept(tmp_path, name):
    assert load_config(write_toml(tmp_path), name=name).study.name == name


def test_empty_study_name_on_the_cli_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the old behaviour: a study in reports/study.db here
    path = write_toml(tmp_path / "conf")
    assert_cli_error(run_main(capsys, "search", path, "--study-name", ""), "study name '' cannot be a folder name")
    assert_cli_error(run_main(capsys, "search", path, "--study-name", "../up"), "study name '../up'")
    assert files_under(tmp_path) == {tmp_path / "conf", tmp_path / "conf" / "study.toml"}


def test_reading_commands_do_not_restrict_names(tmp_path, capsys):
    line = assert_cli_error(run_main(capsys, "pick", "--storage", f"sqlite:///{tmp_path}/none.db", "--study", "a b"))
    assert "folder name" not in line and "no study storage" in line, line


# --- relative storage paths in a TOML ----------------------------------------------


def test_relative_storage_resolves_against_the_toml_folder(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    monkeypatch.chdir(tmp_path)
    os.mkdir("elsewhere")
    monkeypatch.chdir("elsewhere")
    cases = {
        "sqlite:///db/study.db": f"sqlite:///{conf}/db/study.db",
        "journal:logs/j.log": f"journal:{conf}/logs/j.log",
        f"sqlite:///{tmp_path}/abs.db": f"sqlite:///{tmp_path}/abs.db",
        "postgresql://u@host/db": "postgresql://u@host/db",
    }
    for given, wanted in cases.items():
        config = load_config(write_toml(conf, study=f'storage = "{given}"'))
        assert config.storage_url == wanted
    # --storage on the command line stays relative to the working directory
    config = load_config(write_toml(conf, study='storage = "sqlite:///db/study.db"'), storage="sqlite:///here.db")
    assert config.storage_url == "sqlite:///here.db"


def test_search_from_another_directory_uses_the_tomls_storage(tmp_path, monkeypatch, capsys):
    """One real trial (untrained tiny checkpoint, no priors): the study file lands beside the TOML, not in the cwd."""
    from autoprune.model import build_model, save_checkpoint

    conf, elsewhere = tmp_path / "conf", tmp_path / "elsewhere"
    elsewhere.mkdir()
    dense = save_checkpoint(build_model("vgg", width=TINY_WIDTH), tmp_path / "dense.pt")
    path = write_toml(conf, study=f'storage = "sqlite:///db/study.db"\nout_dir = "{tmp_path / "out"}"',
                      model=f'checkpoint = "{dense}"', data='spec = "synthetic:200"', priors="enabled = false")
    monkeypatch.chdir(elsewhere)
    result = run_main(capsys, "search", path, "-q", "--json")
    assert result.returncode == 0, result.stderr
    assert (conf / "db" / "study.db").is_file()
    assert files_under(elsewhere) == set()
