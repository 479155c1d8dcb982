"""Where a study keeps its files: the dense checkpoint and the weights of feasible trials.

A study records its artifact store in the user attribute ``artifact_store``:

* ``{"kind": "file", "path": DIR}``: Optuna's ``FileSystemArtifactStore`` in
  ``DIR`` (also recorded as ``artifact_dir``). Right for one machine, or for
  workers on many machines when ``DIR`` is on a filesystem they all mount at the
  same path.
* ``{"kind": "db"}``: a table ``autoprune_artifacts`` in the study's own
  database (PostgreSQL, MySQL, SQLite), so that a worker anywhere needs nothing
  but the storage URL. The default for server databases. Bodies that compress
  (a fine-grained trial's weights) are stored zlib-compressed (:func:`pack`).

:func:`study_artifact_store` is the one opener of the store a study records
(search, workers, report, export); the files are then read with
``optuna.artifacts.download_artifact`` as usual.
"""

from __future__ import annotations

import io
import logging
import zlib
from pathlib import Path
from typing import BinaryIO

import optuna

from .errors import AutopruneError
from .storage import is_server_url, rdb_storage, storage_kind

log = logging.getLogger("autoprune")

TABLE = "autoprune_artifacts"


# A body stored compressed starts with this; any other body is stored as given (torch's files start "PK").
PACKED = b"autoprune-zlib-1\n"
PACK_SAMPLE = 1 << 20


def pack(data: bytes) -> bytes:
    """``data`` as the database keeps it: zlib (level 1) when a 1 MiB sample shrinks to under 80%.

    A fine-grained trial's weights are mostly zeros: the lab's full-width VGG at size 0.25
    (35 MiB) shrinks to ~40%, and PostgreSQL no longer spends seconds of CPU compressing it
    itself (benchmarks/coordination_load.py). Dense weights hardly shrink: they are kept as is.
    """
    sample = data[:PACK_SAMPLE]
    if len(data) < 4096 or len(zlib.compress(sample, 1)) > 0.8 * len(sample):
        return data
    return PACKED + zlib.compress(data, 1)


def unpack(body: bytes) -> bytes:
    return zlib.decompress(body[len(PACKED):]) if body.startswith(PACKED) else body


class DatabaseArtifactStore:
    """An Optuna artifact store in a table of an RDB storage's own database."""

    def __init__(self, storage) -> None:
        rdb = rdb_storage(storage)
        if rdb is None:
            raise AutopruneError("artifacts = \"db\" needs a database storage (postgresql://, mysql://, sqlite:///); "
                                 "use a directory for journal storages")
        import sqlalchemy as sa
        from sqlalchemy.dialects import mysql

        self._sa = sa
        self._engine = rdb.engine
        meta = sa.MetaData()
        self._table = sa.Table(
            TABLE, meta,
            sa.Column("artifact_id", sa.String(128), primary_key=True),
            sa.Column("body", sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql"), nullable=False),
        )
        self._meta = meta

    def create_table(self) -> None:
        """Create the table if absent (tolerates another process creating it at the same time)."""
        for attempt in range(3):
            try:
                self._meta.create_all(self._engine, checkfirst=True)
                return
            except self._sa.exc.SQLAlchemyError:
                if attempt == 2:
                    raise

    def open_reader(self, artifact_id: str) -> BinaryIO:
        t = self._table
        with self._engine.connect() as conn:
            row = conn.execute(self._sa.select(t.c.body).where(t.c.artifact_id == artifact_id)).first()
        if row is None:
            from optuna.artifacts.exceptions import ArtifactNotFound

            raise ArtifactNotFound(f"artifact {artifact_id} not found in table {TABLE}")
        return io.BytesIO(unpack(bytes(row[0])))

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        data = pack(content_body.read())
        with self._engine.begin() as conn:
            conn.execute(self._table.insert().values(artifact_id=artifact_id, body=data))

    def remove(self, artifact_id: str) -> None:
        t = self._table
        with self._engine.begin() as conn:
            conn.execute(t.delete().where(t.c.artifact_id == artifact_id))


def descriptor_for(setting: str, url: str, out_dir: Path) -> dict:
    """The store a new study gets from ``[study] artifacts`` (see the config)."""
    if setting == "db" or (not setting and is_server_url(url)):
        if storage_kind(url) == "journal":
            raise AutopruneError("[study] artifacts = \"db\" needs a database storage; journal storages keep "
                                 "artifacts in a directory (leave artifacts empty or give a path)")
        return {"kind": "db"}
    path = Path(setting) if setting else out_dir / "artifacts"
    return {"kind": "file", "path": str(path.resolve())}


def open_store(descriptor: dict, storage, create: bool = False):
    if descriptor.get("kind") == "db":
        store = DatabaseArtifactStore(storage)
        if create:
            store.create_table()
        return store
    from optuna.artifacts import FileSystemArtifactStore

    path = Path(descriptor["path"])
    if create:
        path.mkdir(parents=True, exist_ok=True)
    elif not path.is_dir():
        raise AutopruneError(
            f"the study's artifact directory {path} does not exist on this machine; workers on other "
            f"machines need it on a shared filesystem mounted at the same path, or a study created with "
            f"[study] artifacts = \"db\""
        )
    return FileSystemArtifactStore(str(path))


def study_artifact_store(study: optuna.Study, create: bool = False):
    """The artifact store a study records (``artifact_store``, or the older ``artifact_dir``)."""
    attrs = study.user_attrs
    descriptor = attrs.get("artifact_store")
    if descriptor is None and attrs.get("artifact_dir"):
        descriptor = {"kind": "file", "path": attrs["artifact_dir"]}
    if descriptor is None:
        return None
    return open_store(descriptor, study._storage, create=create)
