"""Nothing leaked: storage passwords never reach a study, a message or a report; feasibility in the dashboard.

The PostgreSQL test needs a server (``export AUTOPRUNE_TEST_POSTGRES_URL="$(.ci/postgres.sh start)"``);
see tests/test_workers.py.
"""

from __future__ import annotations

import json
import socket
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autoprune.config import StudyConfig, load_config
from autoprune.pick import is_feasible, named_constraints
from autoprune.report import trials_frame
from autoprune.storage import is_server_url, passwords, redact, scrub, storage_file, storage_kind, with_driver

from conftest import run_cli, run_main, write_study
from test_workers import assert_one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(tmp_path, checkpoint, storage, name="secrets", trials=1, accuracy=None):
    """The tiny study without priors; ``accuracy`` replaces the floor (default: max_accuracy_drop 90)."""
    study = {"name": name, "trials": trials, "out_dir": tmp_path / "reports" / name, "storage": storage}
    return write_study(tmp_path / f"{name}.toml", study=study, model={"checkpoint": checkpoint},
                       constraints=accuracy or {"max_accuracy_drop": 90.0}, priors={"enabled": False})


def free_port() -> int:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- redact --------------------------------------------------------------------------

REDACT = [
    # (url, shown, secrets that must not show)
    ("postgresql://alice:s3cret@db.example:5432/studies", "postgresql://alice:***@db.example:5432/studies",
     ["s3cret"]),
    ("postgresql+psycopg2://alice:s3cret@db:5432/studies?sslmode=require",
     "postgresql+psycopg2://alice:***@db:5432/studies?sslmode=require", ["s3cret"]),
    ("mysql://bob:s3cret@db/studies?charset=utf8mb4", "mysql://bob:***@db/studies?charset=utf8mb4", ["s3cret"]),
    ("sqlite:///reports/demo/study.db", "sqlite:///reports/demo/study.db", []),
    ("journal:reports/demo/study.log", "journal:reports/demo/study.log", []),
    ("postgresql://alice@db:5432/studies", "postgresql://alice@db:5432/studies", []),  # no password
    ("postgresql://db/studies", "postgresql://db/studies", []),
    ("postgresql://alice:@db/studies", "postgresql://alice:***@db/studies", []),  # empty password
    ("postgresql://alice:pa%40ss%2Fw0rd@db/studies", "postgresql://alice:***@db/studies",
     ["pa%40ss%2Fw0rd", "pa@ss/w0rd"]),  # percent-encoded: neither form shows
    # Raw '@', ':', '/', '?', '#' in the password: hidden up to the last '@' of the authority.
    ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db", ["p@ss"]),
    ("postgresql://u:p@s@s@h:5432/db?sslmode=require", "postgresql://u:***@h:5432/db?sslmode=require", ["p@s@s"]),
    ("postgresql://u:p:ss@h:5432/db", "postgresql://u:***@h:5432/db", ["p:ss"]),
    ("postgresql://u:p/ss@h/db", "postgresql://u:***@h/db", ["p/ss"]),
    ("postgresql://u:p?ss@h/db", "postgresql://u:***@h/db", ["p?ss"]),
    ("postgresql://u:p?x=1@h/db", "postgresql://u:***@h/db", ["p?x=1"]),
    ("mysql://u:p#ss@h/db", "mysql://u:***@h/db", ["p#ss"]),
    # Query-string passwords, any case; other parameters stay visible.
    ("postgresql://u@h/db?password=SECRET", "postgresql://u@h/db?password=***", ["SECRET"]),
    ("postgresql://u@h:5432/db?sslmode=require&PassWord=SECRET&application_name=w1",
     "postgresql://u@h:5432/db?sslmode=require&PassWord=***&application_name=w1", ["SECRET"]),
    ("postgresql://u@h/db?sslpassword=SECRET", "postgresql://u@h/db?sslpassword=***", ["SECRET"]),
    ("mysql://u@h/db?passwd=SECRET&charset=utf8mb4", "mysql://u@h/db?passwd=***&charset=utf8mb4", ["SECRET"]),
    ("mssql+pyodbc://u@h/db?PWD=SECRET", "mssql+pyodbc://u@h/db?PWD=***", ["SECRET"]),
    ("postgresql://u@h/db?password=SEC&RET&sslmode=require", "postgresql://u@h/db?password=***&sslmode=require",
     ["SEC&RET"]),  # a raw '&' in the value
    ("postgresql://u:one1@h/db?password=two2", "postgresql://u:***@h/db?password=***", ["one1", "two2"]),
    # A '@' in the query does not end the userinfo.
    ("postgresql://u:s3cret@h/db?sslcert=/certs/a@b.pem", "postgresql://u:***@h/db?sslcert=/certs/a@b.pem",
     ["s3cret"]),
    # A URL SQLAlchemy cannot read (the port is no number) is redacted all the same.
    ("postgresql://u:s3cret@h:port/db", "postgresql://u:***@h:port/db", ["s3cret"]),
]


@pytest.mark.parametrize("url, shown, secrets", REDACT, ids=[r[0] for r in REDACT])
def test_redact(url, shown, secrets):
    assert redact(url) == shown
    assert redact(shown) == shown  # a redacted URL stays as it is (a study stores it so)
    assert sorted(passwords(url)) == sorted(secrets)
    text = f"cannot connect with {url}: {' '.join(secrets)}"
    assert not any(s in scrub(text, url) for s in secrets)


@pytest.mark.parametrize("url, kind, path", [
    ("sqlite:///reports/a/study.db", "sqlite", "reports/a/study.db"),
    ("sqlite:////abs/my%20study.db", "sqlite", "/abs/my study.db"),  # as SQLAlchemy reads it
    ("sqlite:///:memory:", "sqlite", None),
    ("journal:reports/a/journal.log", "journal", "reports/a/journal.log"),
    ("postgresql://u:pw@h:5432/db", "server", None),
    ("postgresql+psycopg://u@h/db", "server", None),
    ("mysql://u@h/db", "server", None),
    ("reports/a/study.db", "", None),  # a bare path is no storage URL
])
def test_one_classifier_for_storage_urls(url, kind, path):
    assert storage_kind(url) == kind
    assert is_server_url(url) == (kind == "server")
    assert storage_file(url) == (None if path is None else Path(path))


def test_a_raw_at_in_the_password_reaches_the_server_whole():
    """SQLAlchemy and libpq would cut ``p@ss`` at its '@' and try host ``ss@h``; autoprune sends it whole."""
    from sqlalchemy.engine import make_url

    u = make_url(with_driver("postgresql://u:p@ss@h:5432/db?sslmode=require"))
    assert (u.username, u.password, u.host, u.port, u.database) == ("u", "p@ss", "h", 5432, "db")
    assert dict(u.query) == {"sslmode": "require"}
    assert with_driver("postgresql://u:pa%40ss@h/db").endswith("://u:pa%40ss@h/db")  # not encoded twice
    assert make_url(with_driver("postgresql://u:p?ss@h/db")).password == "p?ss"


# --- the study's attributes ----------------------------------------------------------

PASSWORD_URL = "postgresql://alice:s3cret@db.example:5432/studies?sslpassword=k3y&sslmode=require"


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, tiny_checkpoint):
    """A study made the way search makes one (create, publish, 3 trials) on SQLite, from a config whose
    ``[study] storage`` holds passwords; a floor of 100% makes every trial infeasible."""
    from autoprune.objective import Objective
    from autoprune.storage import open_storage
    from autoprune.runner import run_trials
    from autoprune.study import create_or_join

    root = tmp_path_factory.mktemp("secrets")
    config = load_config(tiny_config(root, tiny_checkpoint, PASSWORD_URL, trials=3,
                                     accuracy={"max_accuracy_drop": None, "min_accuracy": 100.0}))
    assert config.storage_url == PASSWORD_URL  # what this process would connect with
    url = f"sqlite:///{root}/study.db"
    study, ctx, created = create_or_join(config, open_storage(url), url, device="cpu", progress=False)
    assert created
    run_trials(study, Objective(ctx), 3, url)
    return optuna.load_study(study_name="secrets", storage=url), config


def _everything(study: optuna.Study) -> str:
    """Every attribute of the study and its trials, as text."""
    parts = [study.user_attrs, study._storage.get_study_system_attrs(study._study_id)]
    for t in study.get_trials(deepcopy=False):
        parts += [t.user_attrs, t.system_attrs, t.params]
    return json.dumps(parts, default=str)


def test_the_study_stores_the_storage_redacted(tiny_study):
    study, _ = tiny_study
    stored = study.user_attrs["config"]["study"]["storage"]
    assert stored == redact(PASSWORD_URL)
    assert "alice" in stored and "db.example:5432/studies" in stored and "sslmode=require" in stored
    everything = _everything(study)
    assert "s3cret" not in everything and "k3y" not in everything
    assert StudyConfig.from_dict(study.user_attrs["config"]).study.name == "secrets"  # still a readable config


def test_postgres_study_never_stores_the_password(tmp_path, tiny_checkpoint, pg_url, capsys):
    """A search and a worker on a PostgreSQL URL with a password: not in the study, not in their output."""
    from sqlalchemy.engine import make_url

    right = make_url(pg_url)
    secret = right.password
    if not secret:
        pytest.skip("the test server's URL has no password")
    # The password in the query string instead of the userinfo: the form redact used to print.
    url = (right.set(password=None).render_as_string(hide_password=False)
           + f"?password={secret}&application_name=autoprune-secrets")
    name = f"secrets-{uuid.uuid4().hex[:10]}"  # the server outlives the test run
    search = run_cli("search", tiny_config(tmp_path, tiny_checkpoint, url, name=name), "--device", "cpu",
                     "--threads", "1", "-q")
    assert search.returncode == 0, redact(search.stderr[-2000:])
    # A worker joins with the URL on its command line (the study's copy has no password) and adds a trial.
    worker = run_cli("worker", "--storage", url, "--study", name, "--trials", "2", "--device", "cpu",
                     "--threads", "1", "-q")
    assert worker.returncode == 0, redact(worker.stderr[-2000:])
    for result in (search, worker):
        assert secret not in result.stdout + result.stderr
    from autoprune.storage import open_storage

    study = optuna.load_study(study_name=name, storage=open_storage(url))
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2
    assert study.user_attrs["config"]["study"]["storage"] == redact(url)
    assert "application_name=autoprune-secrets" in study.user_attrs["config"]["study"]["storage"]
    assert secret not in _everything(study)
    # A refused login on the query-string form names the problem without the password.
    wrong = url.replace(f"password={secret}", "password=wr0ng-pass-xyz")
    refused = run_main(capsys, "worker", "--storage", wrong, "--study", name)  # refused before any log line
    assert_one_line_error(refused, "password authentication failed", secrets=["wr0ng-pass-xyz", secret])


# --- error messages ------------------------------------------------------------------


def test_unreachable_server_errors_name_no_password(tmp_path, tiny_checkpoint):
    """Each password form, through each path that opens a storage: worker and search (checked
    connection, retried), pick (report and export open the same way)."""
    port = free_port()
    query = f"postgresql://u@127.0.0.1:{port}/db?password=SECRET"
    at = f"postgresql://u:p@ss@127.0.0.1:{port}/db"
    both = f"postgresql://u:p@ss@127.0.0.1:{port}/db?sslpassword=SECRET"
    runs = [("worker", "--storage", query, "--study", "x"),
            ("pick", "--storage", at, "--study", "x"),
            ("search", tiny_config(tmp_path, tiny_checkpoint, both), "--device", "cpu")]
    with ThreadPoolExecutor(len(runs)) as pool:  # the retries' waits overlap
        results = list(pool.map(lambda args: run_cli(*args), runs))
    for args, result in zip(runs, results):
        assert_one_line_error(result, "cannot open storage", f"127.0.0.1:{port}", secrets=["SECRET", "p@ss"])
        assert result.stderr.count("autoprune: error:") == 1, result.stderr
        # No part of the password was taken for the host ("ss@127.0.0.1").
        assert "ss@" not in result.stderr, result.stderr
        if args[0] != "pick":
            assert f"PostgreSQL server at 127.0.0.1 port {port}" in result.stderr, result.stderr


# --- feasibility in optuna-dashboard -------------------------------------------------


def test_constraints_are_the_list_the_dashboard_reads(tiny_study):
    study, config = tiny_study
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 3
    for t in complete:
        a = t.user_attrs
        # optuna-dashboard 0.21 shows trial.system_attrs["constraints"] (a list), and no named constraint.
        listed = t.system_attrs["constraints"]
        assert a["constraint_names"] == ["size", "accuracy", "fidelity"]
        assert listed == pytest.approx([a["size_fraction"] - 0.3, 100.0 - a["val_accuracy"], 0.0])
        assert named_constraints(t) == dict(zip(a["constraint_names"], listed))
        assert len(t.constraints) == 3  # each constraint once for Optuna's samplers and best_trials
        assert not any(key.startswith("constraints:") for key in t.system_attrs)
        assert not is_feasible(t)  # below the 100% floor
    assert study.best_trials == []  # Optuna reads the list too: no feasible trial, no front
    # The report's table: one column per named constraint, none per list index.
    df = trials_frame(study, config)
    assert {c for c in df.columns if c.startswith("constraint_")} == {
        "constraint_size", "constraint_accuracy", "constraint_fidelity"}
    row = df.set_index("number").loc[complete[0].number]
    assert row["constraint_accuracy"] == pytest.approx(100.0 - complete[0].user_attrs["val_accuracy"])


@pytest.fixture
def mixed_study():
    """Two trials in the list format (one feasible, one not) and one older trial with named constraints."""
    study = optuna.create_study(directions=["minimize", "maximize"])
    names = {"constraint_names": ["size", "accuracy", "fidelity"]}
    study.add_trial(optuna.trial.create_trial(values=[0.25, 50.0], system_attrs={"constraints": [-0.05, -2.0, 0.0]},
                                              user_attrs=names))
    study.add_trial(optuna.trial.create_trial(values=[0.2, 60.0], system_attrs={"constraints": [-0.1, 3.0, 0.0]},
                                              user_attrs=names))
    study.add_trial(optuna.trial.create_trial(values=[0.35, 70.0],
                                              constraints={"size": 0.05, "accuracy": -2.0, "fidelity": 0.0}))
    return study


def test_constraints_of_older_studies_still_read_by_name(mixed_study, tiny_study):
    _, config = tiny_study
    feasible, infeasible, older = mixed_study.get_trials()
    assert named_constraints(feasible) == {"size": -0.05, "accuracy": -2.0, "fidelity": 0.0}
    assert named_constraints(infeasible) == {"size": -0.1, "accuracy": 3.0, "fidelity": 0.0}
    assert named_constraints(older) == {"size": 0.05, "accuracy": -2.0, "fidelity": 0.0}
    assert [is_feasible(t) for t in (feasible, infeasible, older)] == [True, False, False]
    assert [t.number for t in mixed_study.best_trials] == [feasible.number]
    df = trials_frame(mixed_study, config)
    assert {c for c in df.columns if c.startswith("constraint_")} == {
        "constraint_size", "constraint_accuracy", "constraint_fidelity"}
    assert list(df["constraint_accuracy"]) == pytest.approx([-2.0, 3.0, -2.0])


def test_plot_pareto_front_shows_feasibility(mixed_study):
    import matplotlib

    matplotlib.use("Agg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental
        ax = optuna.visualization.matplotlib.plot_pareto_front(mixed_study)
    points = {c.get_label(): len(c.get_offsets()) for c in ax.collections}
    assert points.get("Infeasible Trial") == 2 and points.get("Best Trial") == 1, points
