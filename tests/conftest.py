"""Shared fixtures: the CIFAR-10 subset, a tiny trained checkpoint, the tiny study TOML, and a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
# ../shared/data relative to the repository root (see /work/shared/data/README.md).
SUBSET = REPO.parent / "shared/data/cifar10-subset.npz"

TINY_WIDTH = 0.125
TINY_DATA = "synthetic:600"

# The tests' tiny study (tables of Python values; see write_study). Re-scoring is off:
# tests/test_rescore.py has its own tests.
TINY_STUDY = {
    "study": {"name": "tiny", "kind": "fine_grained", "trials": 1, "seed": 0},
    "model": {"width": TINY_WIDTH, "train_epochs": 2},
    "data": {"spec": TINY_DATA},
    "constraints": {"max_size_fraction": 0.3, "max_accuracy_drop": 40.0},
    "select": {"top_k": 0},
    "finetune": {"epochs": 1, "batch_size": 128},
    "priors": {"grid": [0.5, 0.9], "tolerance": 30.0},
    # channel trials are timed beside the dense model: a few runs (tests/test_latency.py checks the figures)
    "latency": {"repeats": 5, "warmup": 2},
}


def pytest_configure(config):
    """One torch thread per test process, and in the processes the tests start: the suite runs as parallel
    pytest-xdist processes (pyproject's addopts), and tiny models gain nothing from a second thread but stall
    when two processes spin two each on two cores. Set before torch is imported, which reads it."""
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


class Raw(str):
    """A TOML value as written (``'"5"'``, ``"[0.5, nan]"``)."""


def toml_value(value) -> str:
    if isinstance(value, Raw):
        return value
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # a TOML basic string
    return repr(value)  # int, float (1e+30, inf and nan are TOML too)


def write_study(path: Path, base: dict = TINY_STUDY, **tables: dict | str) -> Path:
    """``base`` with ``tables`` merged in, written as TOML to ``path``; returns ``path``.

    A table is a dict of Python values (None drops the key) or TOML lines as written
    (``study='trials = "5"'``); a table not in ``base`` is added. A ``[model] checkpoint``
    replaces the dense training (``train_epochs``).
    """
    content = {table: dict(keys) for table, keys in base.items()}
    for table, keys in tables.items():
        if isinstance(keys, str):
            keys = {k.strip(): Raw(v.strip()) for k, _, v in (line.partition("=") for line in keys.splitlines())
                    if k.strip()}
        content.setdefault(table, {}).update(keys)
    if content["model"].get("checkpoint"):
        content["model"].pop("train_epochs", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(f"[{table}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in keys.items()
                                                      if v is not None) for table, keys in content.items()))
    return path


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


PG_ENV = "AUTOPRUNE_TEST_POSTGRES_URL"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


class SecretURL(str):
    """A URL whose repr (in pytest's reports) hides its password."""

    def __repr__(self) -> str:
        from autoprune.storage import redact

        return repr(redact(str(self)))


@pytest.fixture(scope="session")
def pg_url() -> str:
    """The test PostgreSQL server's URL (tests/test_workers.py says how to start one)."""
    from autoprune.storage import redact

    url = os.environ.get(PG_ENV, "")
    if not url:
        message = (f"{PG_ENV} is not set; start a throwaway PostgreSQL with "
                   f'export {PG_ENV}="$(.ci/postgres.sh start)"')
        if _in_ci():
            pytest.fail(f"{message} (CI is set, so the PostgreSQL tests must run: .ci/run starts the server)")
        pytest.skip(message)
    import psycopg2

    try:
        psycopg2.connect(url, connect_timeout=5).close()
    except Exception as exc:
        pytest.fail(f"{PG_ENV} is set ({redact(url)}) but the server cannot be used: {str(exc).splitlines()[0]}")
    return SecretURL(url)


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


@pytest.fixture(scope="session")
def dense_cache(tmp_path_factory):
    """``dense_cache(config)``: the dense model a study without a checkpoint trains, put in its cache.

    Trained once per recipe (by the function ``run_search`` calls; the same recipe trains the
    same weights, see test_foundation.py), so each study finds it there: ``run_search(dense_cache(config))``.
    """
    import dataclasses
    import shutil

    from autoprune.prepare import dense_cache_path, dense_model

    store = tmp_path_factory.mktemp("dense-cache")

    def put(config):
        data = config.load_data()
        target = dense_cache_path(config, data)
        trained = store / "cache" / target.name
        if not trained.is_file():
            elsewhere = dataclasses.replace(config, study=dataclasses.replace(config.study, out_dir=str(store / "x")))
            dense_model(elsewhere, data, "cpu", progress=False)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(trained, target)
        return config

    return put


def randomized_model(width: float = 0.25, seed: int = 0):
    """A VGG whose every parameter is nonzero and whose BatchNorm stats are not the identity."""
    import torch

    from autoprune.model import build_model

    torch.manual_seed(seed)
    model = build_model("vgg", width=width)
    with torch.no_grad():
        for name, module in model.backbone.named_children():
            if name.startswith("bn"):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
        model.classifier.bias.uniform_(-0.5, 0.5)
    assert all(int(torch.count_nonzero(p)) == p.numel() for p in model.parameters())
    return model.eval()


def run_main(capsys, *args) -> SimpleNamespace:
    """``autoprune ARGS`` in this process (cheaper than a subprocess: no torch import).

    Same code path as ``python -m autoprune`` up to ``sys.exit``; the subprocess
    runs (:func:`run_cli`) cover the real process for a representative share.
    """
    from autoprune.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse errors
        code = exc.code
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def assert_cli_error(result, *needles: str) -> str:
    """Exit code 2, one stderr line ``autoprune: error: ...``, no traceback; returns the line."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("autoprune: error: "), lines[0]
    assert result.stdout == "", result.stdout
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on 2 busy shared cores: one torch thread avoids oversubscription stalls
    (a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
