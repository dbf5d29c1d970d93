"""A baseline trained here, kept in the study's own database so every worker uses the same file.

Without ``--weights`` the first worker trains the baseline and caches it under
``studies/cache/``. A worker on another machine has no such file, and training again would
give different weights (and so a different study). So the creating worker stores the
checkpoint's bytes in a table of the study's database (``prune_search_files``, keyed by the
SHA-256 of the file), and records that hash on the study as ``baseline_file``. A worker that
finds the study and has no matching file in its cache fetches the bytes, checks the hash and
writes them into its cache, where the usual baseline loading finds them.

Only server databases get the copy: a SQLite study is used by one machine, whose cache it shares.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import RDBStorage
from sqlalchemy.dialects import mysql

from search.data.dataset import Dataset
from search.models.checkpoint import file_sha256
from search.progress import NullReporter, Reporter
from search.study.config import SearchConfig
from search.study.storage import load_existing
from search.training.baseline import Baseline, baseline_cache_path, kept_baseline_path

__all__ = ["BASELINE_FILE_ATTR", "adopt_baseline", "fetch_file", "publish_baseline", "store_file"]

BASELINE_FILE_ATTR = "baseline_file"

_METADATA = sqlalchemy.MetaData()
FILES = sqlalchemy.Table(
    "prune_search_files",
    _METADATA,
    sqlalchemy.Column("sha256", sqlalchemy.String(64), primary_key=True),
    sqlalchemy.Column("name", sqlalchemy.String(255), nullable=False),
    sqlalchemy.Column("size", sqlalchemy.BigInteger, nullable=False),
    sqlalchemy.Column("data", sqlalchemy.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql"), nullable=False),
    sqlalchemy.Column("created", sqlalchemy.DateTime, nullable=False),
)


def _shared(storage: RDBStorage) -> bool:
    return not str(storage.engine.url).startswith("sqlite")


def store_file(storage: RDBStorage, path: Path) -> str:
    """Put ``path``'s bytes into the storage's file table (once per content); return their SHA-256."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        FILES.create(storage.engine, checkfirst=True)
    except sqlalchemy.exc.SQLAlchemyError:  # another worker created the table at the same moment
        pass
    with storage.engine.begin() as conn:
        exists = conn.execute(sqlalchemy.select(FILES.c.sha256).where(FILES.c.sha256 == digest)).first()
        if exists is None:
            try:
                conn.execute(
                    FILES.insert().values(
                        sha256=digest, name=path.name, size=len(data), data=data, created=datetime.now()
                    )
                )
            except sqlalchemy.exc.IntegrityError:  # the same file stored by another worker just now
                pass
    return digest


def fetch_file(storage: RDBStorage, sha256: str) -> bytes | None:
    """The bytes stored under ``sha256``, checked against it; None if there are none."""
    try:
        with storage.engine.connect() as conn:
            row = conn.execute(sqlalchemy.select(FILES.c.data).where(FILES.c.sha256 == sha256)).first()
    except sqlalchemy.exc.SQLAlchemyError:  # no file table in this database
        return None
    if row is None:
        return None
    data = bytes(row[0])
    if hashlib.sha256(data).hexdigest() != sha256:
        raise RuntimeError(f"the stored file {sha256[:12]} is corrupt: its bytes hash differently")
    return data


def publish_baseline(storage: RDBStorage, study: optuna.Study, baseline: Baseline) -> None:
    """Store a baseline trained here in the study's database, for workers on other machines."""
    if not baseline.trained_here or not _shared(storage):
        return
    path = Path(baseline.weights)
    digest = store_file(storage, path)
    if baseline.sha256 and digest != baseline.sha256:
        raise RuntimeError(f"baseline file {path} changed while the study was being created")
    study.set_user_attr(BASELINE_FILE_ATTR, {"sha256": digest, "bytes": path.stat().st_size, "name": path.name})


def adopt_baseline(
    storage: RDBStorage, config: SearchConfig, data: Dataset, cache_dir: Path, reporter: Reporter | None = None
) -> bool:
    """Put the study's stored baseline into this worker's cache if it lacks it; True if the cache holds it.

    Does nothing when ``--weights`` is given (the settings check compares that file's hash), when
    the study does not exist yet or has no stored baseline, or when this worker's model, data or
    baseline settings differ from the study's (the settings check then explains what differs).
    """
    reporter = reporter or NullReporter()
    if config.weights is not None:
        return False
    study = load_existing(storage, config.study_name)
    if study is None:
        return False
    attrs = study.user_attrs
    record: dict[str, Any] | None = attrs.get(BASELINE_FILE_ATTR)
    stored_config = attrs.get("config") or {}
    stored_settings = attrs.get("settings") or {}
    if (
        record is None
        or stored_config.get("weights") is not None
        or stored_config.get("model") != config.model
        or stored_config.get("baseline_epochs") != config.baseline_epochs
        or stored_config.get("seed") != config.seed
        or stored_settings.get("data_fingerprint") != data.fingerprint
    ):
        return False
    path = baseline_cache_path(cache_dir, config.model, data, config.baseline_epochs, config.seed)
    if path.exists() and file_sha256(path) == record["sha256"]:
        return True
    content = fetch_file(storage, record["sha256"])
    if content is None:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        temporary.write_bytes(content)
        if path.exists():  # another study's baseline (trained here): kept beside it, where its resume looks
            kept = kept_baseline_path(path, file_sha256(path))
            if not kept.exists():
                os.replace(path, kept)
                reporter.info(f"Baseline: kept the one trained here before as {kept} (its studies still use it)")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    reporter.info(
        f"Baseline: fetched study {config.study_name!r}'s baseline from its storage into {path} "
        f"(sha256 {record['sha256'][:12]}, checked)"
    )
    return True
