"""Study storage: open an Optuna storage from a URL, never printing its password.

* ``sqlite:///PATH`` (the default, one file, resumable) and any other
  SQLAlchemy URL (``postgresql://user:pass@host/db`` for workers on many
  machines) -> Optuna's ``RDBStorage`` with heartbeats, so a trial whose worker
  died is marked failed after the grace period and retried.
* ``journal:PATH`` -> Optuna's ``JournalStorage`` on a journal file, for several
  processes on one host.

:func:`storage_kind` is the one place a URL is classified (``sqlite``,
``journal``, ``server``) and :func:`storage_file` the one place a file URL's
path is read.

A URL's passwords (``user:PASSWORD@`` and the query's ``password``, ``passwd``,
``pwd``, ``sslpassword``) never leave this process: :func:`redact` is the form to
print, log, report or store in a study; :func:`scrub` takes them out of any other
text (a driver's error message, a report file).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
from pathlib import Path
from urllib.parse import unquote

import optuna
import warnings

from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from .errors import AutopruneError

log = logging.getLogger("autoprune")

MAX_RETRY = 3


# Query-string keys that carry a password: libpq's password and sslpassword, MySQL's passwd, ODBC's PWD.
_PASSWORD_KEYS = ("password", "passwd", "pwd", "sslpassword")
_USERINFO = re.compile(r"[^:/]*:([^@]*)@")  # user:password@ as SQLAlchemy reads it (to the first '@')
_QUERY = re.compile(r"\?[^?&=#]*=")  # where a query string starts: "?name="
_PARAM = re.compile(r"[?&]([^?&=#]*)=")  # a query parameter: "?name=" or "&name="


def storage_kind(url: str) -> str:
    """``journal`` (``journal:PATH``), ``sqlite`` (``sqlite:///PATH``), ``server`` (a database reached over
    the network: ``postgresql://``, ``mysql://``, ...), or ``""`` (not a storage URL)."""
    if url.startswith("journal:"):
        return "journal"
    if url.startswith("sqlite:"):
        return "sqlite"
    return "server" if "://" in url else ""


def is_server_url(url: str) -> bool:
    """A database reached over the network (not a file): postgresql://, mysql://, ..."""
    return storage_kind(url) == "server"


def _userinfo_password(url: str) -> tuple[int, int] | None:
    """(start, end) of the password in ``user:password@``, or None.

    It runs to the last '@' before the query string: SQLAlchemy and libpq stop at
    the first one and take the rest of the password for the host.
    """
    if storage_kind(url) == "journal" or "://" not in url:
        return None
    userinfo = _USERINFO.match(url, url.index("://") + 3)
    if not userinfo:
        return None
    query = _QUERY.search(url, userinfo.end())
    return userinfo.start(1), url.rindex("@", 0, query.start() if query else len(url))


def _password_spans(url: str) -> list[tuple[int, int]]:
    """(start, end) of every password in ``url``: the userinfo's, then each password query parameter's.

    A plain string parse, so that a URL SQLAlchemy cannot read is redacted too.
    """
    if storage_kind(url) == "journal" or "://" not in url:
        return []
    userinfo = _userinfo_password(url)
    spans = [userinfo] if userinfo else []
    params = list(_PARAM.finditer(url, userinfo[1] if userinfo else url.index("://")))
    for i, m in enumerate(params):
        if unquote(m.group(1)).strip().lower() in _PASSWORD_KEYS:
            # The value runs to the next "&name=", so a raw '&' inside it stays hidden.
            spans.append((m.end(), params[i + 1].start() if i + 1 < len(params) else len(url)))
    return spans


def redact(url: str) -> str:
    """``url`` with every password (userinfo and query string) replaced by ***: safe to print, log or store."""
    for start, end in reversed(_password_spans(url)):
        url = url[:start] + "***" + url[end:]
    return url


def passwords(*urls: str) -> list[str]:
    """Every password in ``urls``, as written and percent-decoded, longest first (empty ones left out)."""
    found = {form for url in urls if url for start, end in _password_spans(url)
             for form in (url[start:end], unquote(url[start:end])) if form}
    return sorted(found, key=len, reverse=True)


def scrub(text: str, *urls: str) -> str:
    """``text`` (a driver's error message, a report) with every password of ``urls`` replaced by ***."""
    for secret in passwords(*urls):  # longest first: a shorter one inside it cannot leave a tail behind
        text = text.replace(secret, "***")
    return text


def error_reason(exc: BaseException, *urls: str) -> str:
    """The first line of a (driver's) error, without the passwords of ``urls``: for a one-line message."""
    orig = getattr(exc, "orig", None) or exc  # SQLAlchemy wraps the driver's error
    lines = [line.strip() for line in str(orig).splitlines() if line.strip()]
    return scrub(lines[0] if lines else type(orig).__name__, *urls)[:240]  # scrubbed before cut: no half password


def redacted_config(config) -> dict:
    """A StudyConfig's dict with its storage URL redacted: what a study stores and a report shows."""
    d = config.to_dict()
    d["study"]["storage"] = redact(d["study"].get("storage") or "")
    return d


def with_driver(url: str) -> str:
    """The URL to hand SQLAlchemy: ``postgresql://`` with the installed driver, a raw '@' in the password encoded.

    SQLAlchemy 2.1 reads a bare ``postgresql://`` as psycopg 3; autoprune's
    ``postgres`` extra installs psycopg2. An explicit ``postgresql+DRIVER://`` is kept.
    A password with a raw '@' is sent whole instead of being cut at its first '@'
    (see :func:`_userinfo_password`).
    """
    userinfo = _userinfo_password(url)
    if userinfo:
        start, end = userinfo
        url = url[:start] + url[start:end].replace("@", "%40") + url[end:]
    if not url.startswith("postgresql://"):
        return url
    import importlib.util

    for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{driver}://" + url[len("postgresql://"):]
    return url


def worker_id() -> str:
    """This process as a study records it (the ``worker`` trial attribute): ``host:pid``."""
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def rdb_storage(storage) -> "RDBStorage | None":
    """The RDBStorage behind ``storage`` (Optuna wraps it in a cache), or None."""
    storage = getattr(storage, "_backend", storage)
    return storage if isinstance(storage, RDBStorage) else None


def set_user_attrs(trial: optuna.Trial, attrs: dict) -> None:
    """``trial.set_user_attr(key, value)`` for each of ``attrs``: in one transaction on a database storage.

    Optuna writes each attribute in a transaction of its own (~5 round trips) and a trial
    records ~25 of them, most of a worker's round trips per trial
    (benchmarks/coordination_load.py). Here the trial row is locked, its old values of these
    keys deleted and the new ones inserted at once; like Optuna, it refuses a finished trial.
    """
    rdb = rdb_storage(trial.storage)
    if rdb is None or len(attrs) < 2:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    import json

    import sqlalchemy as sa

    rows = [{"trial_id": trial._trial_id, "key": key, "value_json": json.dumps(value)} for key, value in attrs.items()]
    with rdb.engine.begin() as conn:
        lock = "" if conn.dialect.name == "sqlite" else " FOR UPDATE"  # as Optuna locks it to finish it
        state = conn.execute(sa.text(f"SELECT state FROM trials WHERE trial_id = :trial{lock}"),
                             {"trial": trial._trial_id}).scalar()
        if state is None or TrialState[getattr(state, "name", state)].is_finished():
            raise optuna.exceptions.UpdateFinishedTrialError(
                f"trial {trial.number} is already finished ({getattr(state, 'name', state)}); its attributes "
                f"cannot change")
        conn.execute(sa.text("DELETE FROM trial_user_attributes WHERE trial_id = :trial AND key IN :keys")
                     .bindparams(sa.bindparam("keys", expanding=True)),
                     {"trial": trial._trial_id, "keys": list(attrs)})
        conn.execute(_user_attrs_table().insert(), rows)
    cached = getattr(trial, "_cached_frozen_trial", None)  # what trial.user_attrs reads, as set_user_attr keeps it
    if cached is not None:
        cached.user_attrs.update(attrs)


def _user_attrs_table():
    import sqlalchemy as sa

    return sa.table("trial_user_attributes", sa.column("trial_id"), sa.column("key"), sa.column("value_json"))


def storage_file(url: str) -> Path | None:
    """The file behind a ``sqlite:///PATH`` or ``journal:PATH`` URL; None for server databases."""
    kind = storage_kind(url)
    path = url[len("journal:"):] if kind == "journal" else None
    if kind == "sqlite" and url.startswith("sqlite:///"):
        from sqlalchemy.engine import make_url

        try:
            path = make_url(url).database  # as SQLAlchemy reads it: %20 is a space, ?... a query
        except Exception:
            path = None
    return Path(path) if path and path != ":memory:" else None


@contextlib.contextmanager
def file_lock(path: str | Path):
    """An exclusive lock on ``path`` (created if absent) across processes; released if we die."""
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def pg_lock(engine, key: int):
    """A PostgreSQL advisory lock on ``key`` (see :func:`lock_key`) held for the block; released if we die."""
    import sqlalchemy as sa

    with engine.connect() as conn, conn.begin():  # released at the end of the transaction, or if we die
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
        yield


def lock_key(name: str) -> int:
    """A PostgreSQL advisory lock key for ``name``."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def setup_lock_path(url: str) -> Path | None:
    """The lock file that serialises creating the schema and studies in a storage file."""
    path = storage_file(url)
    return None if path is None else path.with_name(path.name + ".autoprune-setup.lock")


def open_storage(url: str, heartbeat_seconds: int = 30, create: bool = True) -> optuna.storages.BaseStorage:
    """Open the storage at ``url``; errors name it without its password.

    ``create``: make the file and its schema if absent (a search); readers (pick, report,
    export, workers) pass False and write nothing, not even a lock file.
    """
    given, shown, url = url, redact(url), with_driver(url)
    try:
        path = storage_file(url)
        if path is not None and create:
            path.parent.mkdir(parents=True, exist_ok=True)
        if storage_kind(url) == "journal":
            return JournalStorage(JournalFileBackend(str(path)))
        # Two processes creating a new SQLite file's schema at once: the second fails with
        # "UNIQUE constraint failed: alembic_version" unless they take turns.
        new = path is not None and not _sqlite_schema_done(path)
        if new and not create:
            raise AutopruneError(f"{path} is not an Optuna study database; check --storage (a search writes "
                                 f"sqlite:///reports/NAME/study.db)")
        with file_lock(setup_lock_path(url)) if new else contextlib.nullcontext(), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = RDBStorage(
                url,
                heartbeat_interval=heartbeat_seconds,
                grace_period=3 * heartbeat_seconds,
                heartbeat_stale_trial_callback=retry_callback(),
            )
            if storage_kind(url) == "server":
                _ping_when_idle(storage.engine)
            return storage
    except AutopruneError:
        raise
    except Exception as exc:
        raise AutopruneError(
            f"cannot open storage {shown}: {error_reason(exc, given, url)}; check the URL, the server and the file"
        ) from None


# A pooled connection unused this long is checked before use (see _ping_when_idle).
IDLE_PING_S = 10.0


def _ping_when_idle(engine) -> None:
    """Check a pooled server connection before use when it sat idle ``IDLE_PING_S`` or more.

    SQLAlchemy's ``pool_pre_ping`` checks every checkout: a round trip in each of the ~30
    transactions of a trial. A connection used a moment ago is alive; one left idle through
    a trial may have been dropped (a server restart, a firewall's idle timeout) and is
    replaced before the query, as pre-ping would.
    """
    import time

    import sqlalchemy as sa
    from sqlalchemy import event

    @event.listens_for(engine, "checkin")
    def _checkin(dbapi_connection, record):
        record.info["autoprune_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_connection, record, proxy):
        since = record.info.get("autoprune_idle_since")
        if since is None or time.monotonic() - since < IDLE_PING_S:  # new, or just used
            return
        try:
            cursor = dbapi_connection.cursor()
            cursor.execute("SELECT 1")
            cursor.close()
        except Exception:
            raise sa.exc.DisconnectionError() from None  # the pool drops it and connects afresh


def _sqlite_schema_done(path: Path) -> bool:
    """Whether the SQLite file holds Optuna's whole schema (its version row is written last); reads only."""
    import sqlite3
    from urllib.parse import quote

    try:
        with contextlib.closing(sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True)) as conn:
            return conn.execute("SELECT count(*) FROM alembic_version").fetchone()[0] > 0
    except sqlite3.Error:  # no file, not a database, no schema yet
        return False


# The one user attribute a retried trial inherits: where its parameters came from.
RETRY_KEEPS = ("warm_start",)


class _RetryCallback(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry (same parameters), minus what the dead run recorded: Optuna copies the
    failed trial's attributes, and a copied ``worker`` naming a dead process would make the
    retry look dead at once, while copied results (``weights_artifact_id``, figures,
    constraints) would outlive a rerun that does not overwrite them."""

    def __call__(self, study, trial) -> None:
        import copy

        trial = copy.deepcopy(trial)
        trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k in RETRY_KEEPS}
        trial.system_attrs = {k: v for k, v in trial.system_attrs.items() if not k.startswith("constraints")}
        super().__call__(study, trial)


def retry_callback() -> RetryHeartbeatStaleTrialCallback:
    """Optuna's retry of a failed trial (same parameters), as autoprune retries: see ``_RetryCallback``."""
    with warnings.catch_warnings():  # experimental in Optuna 5, and the documented way
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _RetryCallback(max_retry=MAX_RETRY)


def recover_dead_local_trials(study: optuna.Study) -> list[int]:
    """Fail and retry RUNNING trials whose worker was a process on this host that is gone.

    Heartbeats catch dead workers anywhere, but only after the grace period;
    a worker on this host can be checked at once (Optuna's journal storage has
    no heartbeat at all).
    """
    import socket

    host = socket.gethostname()
    recovered = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker", "")
        wh, _, pid = worker.rpartition(":")
        started = t.datetime_start.timestamp() if t.datetime_start else None
        if wh != host or not pid.isdigit() or alive(int(pid), started):
            continue
        try:
            if not study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:  # finished (or failed by another worker) meanwhile
            continue
        retry_callback()(study, study._storage.get_trial(t._trial_id))
        log.info("trial %d was left running by process %s, which is gone: marked failed and queued again",
                 t.number, pid)
        recovered.append(t.number)
    return recovered


def alive(pid: int, since: float | None = None) -> bool:
    """Whether process ``pid`` lives and is the one that started a trial at ``since`` (epoch seconds).

    On Linux a zombie (killed, not yet reaped) counts as gone, and so does a process
    that started after the trial did: the dead worker's pid was reused.
    """
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if fields[0] in ("Z", "X"):
            return False
        if since is not None:
            boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                        if line.startswith("btime "))
            process_start = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
            if process_start > since + 2.0:  # clock ticks and btime are coarse: allow slack
                return False
    except (OSError, ValueError, IndexError, StopIteration):
        pass  # no /proc: trust os.kill
    return True
