"""The study as stored: connect, open, create, join and publish it.

``autoprune search STUDY.toml`` creates a study (dense model, priors, space);
``autoprune worker --storage URL --study NAME`` joins it from any machine. A
worker needs nothing but the storage: the study records its config
(``config``), dense figures and accuracy floor, the search space bounds
(``space_upper``, so no sensitivity scan is re-run) and its dense checkpoint,
uploaded as an artifact (``checkpoint_artifact_id``) into the study's artifact
store (see :mod:`autoprune.artifacts`). The creator marks the study ``ready``
last; joiners wait for that mark. One process at a time looks for, creates and
sets up a study (:func:`setup_lock`). A failed setup deletes the half-made
study; one left half made by a creator that is gone (a dead process on this
host, or none recorded) is deleted and set up anew by the next search.

The trials themselves run in :mod:`autoprune.runner`; the search and the
worker command on top of both are in :mod:`autoprune.search`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import socket
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.trial import TrialState

from .artifacts import descriptor_for, open_store, study_artifact_store
from .config import StudyConfig
from .errors import AutopruneError
from .files import atomic_path, file_digest
from .storage import (alive, error_reason, file_lock, is_server_url, lock_key, open_storage, pg_lock, rdb_storage,
                      redact, setup_lock_path, storage_file, with_driver, worker_id)

if TYPE_CHECKING:
    from .objective import TrialContext
# The trial context (and torch) is imported where a study is set up or joined: opening a study needs neither.

log = logging.getLogger("autoprune")

READY_TIMEOUT_S = 300.0  # how long a joiner waits for the creator to finish setting up
CONNECT_TRIES = 3


# --- connecting --------------------------------------------------------------


def connect_storage(url: str, heartbeat_seconds: int = 30, tries: int = CONNECT_TRIES,
                    first_wait: float = 1.0, create: bool = True) -> optuna.storages.BaseStorage:
    """``open_storage`` with, for server databases, a checked connection first.

    An unreachable server is retried ``tries`` times with a doubling wait
    (1 s, 2 s, ...), then reported naming its host and port; a refused login
    or a missing database is reported at once. No message holds the password.
    """
    if is_server_url(url):
        _preflight(url, tries, first_wait)
    return open_storage(url, heartbeat_seconds=heartbeat_seconds, create=create)


def _preflight(url: str, tries: int, first_wait: float) -> None:
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    given, shown, url = url, redact(url), with_driver(url)
    try:
        u = make_url(url)
    except Exception:
        raise AutopruneError(f"cannot read the storage URL {shown}; expected e.g. "
                             f"postgresql://USER:PASSWORD@HOST:5432/DB") from None
    backend = u.get_backend_name()
    server = {"postgresql": "PostgreSQL", "mysql": "MySQL", "mariadb": "MariaDB"}.get(backend, backend)
    host = u.host or "localhost"
    port = u.port or {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}.get(backend, "default port")
    where = f"{server} server at {host} port {port}"
    args = {"connect_timeout": 5} if backend in ("postgresql", "mysql", "mariadb") else {}
    try:
        engine = sa.create_engine(url, poolclass=NullPool, connect_args=args)
    except Exception as exc:  # no driver, bad URL
        raise AutopruneError(f"cannot open storage {shown}: {error_reason(exc, given, url)}"
                             + ("; pip install 'autoprune[postgres]'" if backend == "postgresql" else "")) from None
    start, reason = time.monotonic(), ""
    try:
        for attempt in range(tries):
            try:
                with engine.connect() as conn:
                    conn.execute(sa.text("SELECT 1"))
                return
            except sa.exc.SQLAlchemyError as exc:
                reason = error_reason(exc, given, url)
                low = reason.lower()
                if "authentication failed" in low or "password" in low or "access denied" in low:
                    raise AutopruneError(
                        f"cannot open storage {shown}: the {where} refused the login of user "
                        f"{u.username!r} (password authentication failed); check the user and password "
                        f"in the URL") from None
                if "does not exist" in low or "unknown database" in low:
                    raise AutopruneError(f"cannot open storage {shown}: {reason}; create the database "
                                         f"first (e.g. createdb {u.database})") from None
                if attempt + 1 < tries:
                    wait = first_wait * 2 ** attempt
                    log.warning("cannot reach the %s (try %d of %d): %s; retrying in %.0fs",
                                where, attempt + 1, tries, reason, wait)
                    time.sleep(wait)
    finally:
        engine.dispose()
    raise AutopruneError(
        f"cannot open storage {shown}: cannot reach the {where} after {tries} tries over "
        f"{time.monotonic() - start:.0f}s ({reason}); is the server running and reachable from this machine?")


def find_study(storage, name: str) -> optuna.Study | None:
    try:
        storage.get_study_id_from_name(name)
    except KeyError:
        return None
    return optuna.load_study(study_name=name, storage=storage)


def load_existing_study(storage, name: str, url: str) -> optuna.Study:
    study = find_study(storage, name)
    if study is None:
        names = sorted(optuna.get_all_study_names(storage))
        known = ", ".join(names) if names else "none"
        raise AutopruneError(f"no study named {name!r} in {redact(url)}; studies there: {known} "
                             f"(create one with: autoprune search STUDY.toml --storage URL)")
    return study


def open_existing(storage_url: str, study_name: str) -> tuple[optuna.Study, StudyConfig]:
    """The study ``study_name`` in ``storage_url`` and its config; nothing is created."""
    if not storage_url:
        raise AutopruneError("no storage given; pass --storage URL (e.g. sqlite:///reports/NAME/study.db)")
    path = storage_file(storage_url)
    if path is not None and not path.is_file():
        raise AutopruneError(f"no study storage at {path}; check --storage (a search writes "
                             f"sqlite:///reports/NAME/study.db by default)")
    storage = open_storage(storage_url, create=False)
    study = load_existing_study(storage, study_name, storage_url)
    raw = study.user_attrs.get("config")
    if not isinstance(raw, dict):
        raise AutopruneError(f"study {study_name!r} in {redact(storage_url)} has no 'config' user attribute; "
                             f"it was not made by autoprune search")
    return study, StudyConfig.from_dict(raw)


def is_ready(study: optuna.Study) -> bool:
    """Whether the study's creator finished setting it up (``ready``, or made before that mark)."""
    attrs = study.user_attrs
    return bool(attrs.get("ready")) or ("created_by" not in attrs and "config" in attrs and "space_upper" in attrs
                                        and "checkpoint" in attrs and bool(study.get_trials(deepcopy=False)))


def dead_creator(study: optuna.Study) -> str | None:
    """Why the study's creator is known to be gone (a dead process on this host), or None."""
    host, _, pid = study.user_attrs.get("created_by", "").rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and not alive(int(pid)):
        return f"its creator (process {pid} on this host) died while setting it up"
    return None


def wait_ready(study: optuna.Study, timeout: float = READY_TIMEOUT_S) -> dict:
    """The study's user attributes once its creator has finished setting it up."""
    deadline = time.monotonic() + timeout
    said = False
    while True:
        if is_ready(study):
            return study.user_attrs
        gone = dead_creator(study)
        if gone or time.monotonic() > deadline:
            why = gone or f"its creator has not finished setting it up after {timeout:.0f}s (or died doing so)"
            raise AutopruneError(
                f"study {study.study_name!r} is not ready: {why}; run its autoprune search again, which sets "
                f"it up anew (or delete it: optuna delete-study --study-name {study.study_name} --storage URL)")
        if not said:
            log.info("study %r: waiting for its creator to finish setting it up", study.study_name)
            said = True
        time.sleep(1.0)


# --- creating and joining ----------------------------------------------------

# The parts of a config that define the search: a study refuses a joiner whose differ.
_IDENTITY = {"study": ("kind", "criterion", "budget_low"),
             "model": ("source", "name", "width", "kwargs", "cifar_stem", "exclude", "num_classes"),
             "constraints": None, "pruning": None, "finetune": None, "priors": ("enabled", "grid", "tolerance")}


def check_same_search(study: optuna.Study, config: StudyConfig) -> None:
    stored = study.user_attrs.get("config")
    directions = ["maximize" if o == "accuracy" else "minimize" for o in config.objectives]
    diffs = []
    if [d.name.lower() for d in study.directions] != directions:
        diffs.append(f"objectives {[d.name.lower() for d in study.directions]} in the study vs {directions} here")
    if isinstance(stored, dict):
        mine = config.to_dict()
        for section, keys in _IDENTITY.items():
            theirs, ours = stored.get(section, {}), mine[section]
            for key in keys or ours:
                if key in theirs and theirs[key] != ours[key]:
                    diffs.append(f"[{section}] {key}: {theirs[key]!r} in the study vs {ours[key]!r} here")
    if diffs:
        raise AutopruneError(
            f"study {study.study_name!r} already exists with another search space or objectives "
            f"({'; '.join(diffs[:3])}); use another --study-name or storage (nothing was changed)")


def setup_lock(url: str, storage, name: str):
    """A context manager under which one process at a time looks for, takes over or creates study ``name``.

    A file lock beside SQLite and journal files; a PostgreSQL advisory lock; none elsewhere.
    """
    path = setup_lock_path(url)
    if path is not None:
        return file_lock(path)
    rdb = rdb_storage(storage)
    if rdb is not None and rdb.engine.dialect.name == "postgresql":
        return pg_lock(rdb.engine, lock_key(f"autoprune-setup:{name}"))
    return contextlib.nullcontext()


def abandoned(study: optuna.Study) -> str | None:
    """Why a half-made study can be set up anew (its creator is gone, nothing ran in it), or None.

    Call under :func:`setup_lock`: a creator holds it from ``create_study`` until the study is
    ready, so a study seen there without a recorded creator was left by one that died.
    """
    if is_ready(study) or any(t.state != TrialState.WAITING for t in study.get_trials(deepcopy=False)):
        return None
    if "created_by" not in study.user_attrs:
        return "no creator is recorded"
    return dead_creator(study)


def create_or_join(config: StudyConfig, storage, url: str, device="auto", progress: bool = True):
    """The study named by ``config``, created (and set up) here or joined: (study, ctx, created).

    A study left half made by a creator that is gone is deleted and set up again here.
    """
    from .prepare import prepare

    name = config.study.name
    with setup_lock(url, storage, name):
        study = find_study(storage, name)
        why = study is not None and abandoned(study)
        if why:
            log.warning("study %r was left half made (%s): setting it up anew", name, why)
            optuna.delete_study(study_name=name, storage=storage)
            study = None
    if study is None:
        ctx, info = prepare(config, device, progress)
        directions = ["maximize" if o == "accuracy" else "minimize" for o in config.objectives]
        with setup_lock(url, storage, name):
            try:
                study = optuna.create_study(storage=storage, study_name=name, directions=directions)
            except optuna.exceptions.DuplicatedStudyError:  # another process created it meanwhile
                log.info("study %r was created by another process meanwhile: joining it", name)
                study = optuna.load_study(study_name=name, storage=storage)
            else:
                publish(study, config, info, ctx, storage, url)
                return study, ctx, True
    check_same_search(study, config)
    wait_ready(study)
    return study, worker_context(study, url, device, progress), False


def publish(study: optuna.Study, config: StudyConfig, info: dict, ctx: TrialContext, storage, url: str) -> None:
    """Record everything a worker needs in a new study, then mark it ready.

    If that fails (a full disk, Ctrl-C) the half-made study and its uploaded checkpoint are
    removed before the error is raised, so the same command can simply run again.
    """
    store, artifact_id = None, None
    try:
        study.set_user_attr("created_by", worker_id())
        for key, value in info.items():
            study.set_user_attr(key, value)
        starts = {}
        if config.priors.enabled and config.priors.enqueue_allocation and info.get("prior_allocation"):
            starts["prior allocation"] = info["prior_allocation"]
        starts.update(info.get("warm_starts") or {})
        for name, ratios in starts.items():
            clipped = [n for n, v in ratios.items() if v > ctx.space.upper.get(n, 0.0) + 1e-9]
            if clipped:
                log.info("warm start %s: %s clipped to the prior bounds, then shifted back onto the cap", name,
                         ", ".join(clipped))
            study.enqueue_trial(ctx.space.initial_params(ratios), user_attrs={"warm_start": name})
        if starts:
            log.info("enqueued as the first trials, at the cap: %s (then the sampler searches around them)",
                     ", ".join(starts))
        descriptor = descriptor_for(config.study.artifacts, url, config.out_dir)
        store = open_store(descriptor, storage, create=True)
        study.set_user_attr("artifact_store", descriptor)
        if descriptor["kind"] == "file":
            study.set_user_attr("artifact_dir", descriptor["path"])
        from optuna.artifacts import upload_artifact

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            artifact_id = upload_artifact(artifact_store=store, file_path=info["checkpoint"], study_or_trial=study)
        study.set_user_attr("checkpoint_artifact_id", artifact_id)
        ctx.artifact_store = store
        study.set_user_attr("ready", True)
    except BaseException as exc:
        _discard(study, storage, store, artifact_id)
        if isinstance(exc, OSError):
            raise AutopruneError(
                f"setting up study {study.study_name!r} failed: {exc.strerror or exc}; the half-made study was "
                f"removed, so once that is fixed the same command starts afresh") from None
        raise
    log.info("study %r created in %s; workers join with: autoprune worker --storage URL --study %s",
             study.study_name, redact(url), study.study_name)


def _discard(study: optuna.Study, storage, store, artifact_id: str | None) -> None:
    """Best effort: delete a study that failed to set up (a later search would take it over anyway)."""
    try:
        if artifact_id is not None:
            store.remove(artifact_id)
        optuna.delete_study(study_name=study.study_name, storage=storage)
    except Exception as exc:
        log.warning("could not remove the half-made study %r (%s); the next autoprune search takes it over",
                    study.study_name, str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "autoprune"


def study_checkpoint(study: optuna.Study, store) -> str:
    """A local copy of the study's dense checkpoint: its recorded path if the bytes match, else the artifact."""
    attrs = study.user_attrs
    path, digest = attrs.get("checkpoint", ""), attrs.get("checkpoint_sha256")
    if path and Path(path).is_file() and (digest is None or file_digest(path) == digest):
        return path
    artifact_id = attrs.get("checkpoint_artifact_id")
    if not artifact_id or store is None:
        raise AutopruneError(f"the study's dense checkpoint {path} is not on this machine and the study has no "
                             f"uploaded copy (it was created before workers could join); copy it to that path")
    # The cache file is named by a hash, never by the study's text (an id like /../../x would escape the cache).
    name = (digest if re.fullmatch(r"[0-9a-f]{64}", str(digest))
            else hashlib.sha256(str(artifact_id).encode()).hexdigest())
    local = cache_dir() / f"dense-{name[:16]}.pt"
    if local.is_file() and (digest is None or file_digest(local) == digest):
        return str(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(local) as tmp:
        try:
            with store.open_reader(artifact_id) as reader, open(tmp, "wb") as f:
                shutil.copyfileobj(reader, f)
        except AutopruneError:
            raise
        except Exception as exc:
            raise AutopruneError(f"cannot fetch the study's dense checkpoint (artifact {artifact_id}): "
                                 f"{str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from None
        if digest is not None and file_digest(tmp) != digest:
            raise AutopruneError(f"the study's dense checkpoint artifact {artifact_id} does not match its recorded "
                                 f"sha256 {digest[:12]}...; the study's artifact store is damaged")
    log.info("dense checkpoint: fetched from the study's artifact store to %s", local)
    return str(local)


def study_config(study: optuna.Study, url: str) -> StudyConfig:
    stored = study.user_attrs.get("config")
    if not isinstance(stored, dict):
        raise AutopruneError(f"study {study.study_name!r} has no stored config: it was not made by autoprune "
                             f"search, so a worker cannot join it")
    config = StudyConfig.from_dict(stored).validate()
    config.study.name = study.study_name
    config.study.storage = url
    return config


def worker_context(study: optuna.Study, url: str, device="auto", progress: bool = True) -> TrialContext:
    """A worker's TrialContext, built from what the study records (no dense training, no scan)."""
    from .objective import TrialContext
    from .prepare import load_dense_checkpoint
    from .sources import prunable
    from .space import SearchSpace
    from .train import resolve_device

    attrs = study.user_attrs
    config = study_config(study, url)
    device = resolve_device(device)
    data = config.load_data().to(device)
    store = study_artifact_store(study)
    dense = load_dense_checkpoint(config, study_checkpoint(study, store))
    space = SearchSpace.for_study(config, prunable(dense).cost_model(), attrs.get("space_upper"),
                                  config.model.num_classes, dense_figures=attrs["dense"])
    if attrs.get("space_centre_ratios") is not None:  # a centred space: its centre and ranges as recorded
        space.centre = dict(attrs["space_centre_ratios"])
        space.spread = {n: tuple(v) for n, v in attrs["space_spread"].items()}
    if attrs.get("space_signature") not in (None, space.signature()):
        raise AutopruneError(f"the search space rebuilt from study {study.study_name!r} has signature "
                             f"{space.signature()}, not the recorded {attrs['space_signature']}; the study's "
                             f"checkpoint or attributes were changed")
    log.info("joined study %r in %s: %s trials, dense val %.2f%%, floor %.2f%%", study.study_name, redact(url),
             config.study.kind, attrs["dense"]["val_accuracy"], attrs["accuracy_floor"])
    return TrialContext(config=config, space=space, dense=dense.to(device).eval(), data=data,
                        floor=attrs["accuracy_floor"], dense_figures=attrs["dense"], artifact_store=store,
                        progress=progress)
