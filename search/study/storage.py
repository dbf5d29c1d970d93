"""Opening study storage from a SQLAlchemy URL, with one-line errors for unusable URLs."""

from __future__ import annotations

import fcntl
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import NamedTuple

import optuna
from optuna.storages import RDBStorage

from search.errors import UsageError
from search.study.folders import first_missing, remove_unused
from search.study.retry import RetryStaleTrial
from search.study.urls import masked, with_driver
from search.study.urls import without_password as _without_password

__all__ = [
    "NewFile",
    "default_storage_url",
    "discard_if_empty",
    "load_existing",
    "masked",
    "new_sqlite_file",
    "open_storage",
    "open_study",
]

HEARTBEAT_SECONDS = 60
"""Default heartbeat: a running trial whose worker has been silent for 2x this long is marked failed.

A study keeps the value it was created with (``--heartbeat``); see ``search.study.coordination``."""


def default_storage_url(studies_dir: Path, study: str) -> str:
    return f"sqlite:///{studies_dir / study}.db"


def open_storage(url: str, heartbeat_seconds: int = HEARTBEAT_SECONDS) -> RDBStorage:
    """An Optuna RDB storage for ``url``, with heartbeats so a killed worker's trial is retried once."""
    if "://" not in url:
        raise UsageError(f"storage {masked(url)!r} is not a SQLAlchemy URL; use e.g. sqlite:///studies/name.db")
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///") :])
        _check_folder(path, url)
        if str(path) and path.parent and not path.parent.exists():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UsageError(
                    f"cannot create the folder {path.parent} for storage {masked(url)!r}: {exc.strerror or exc}; "
                    "pick a writable --studies-dir or --storage"
                ) from None
    try:
        return _rdb_storage(with_driver(url), heartbeat_seconds)
    except ModuleNotFoundError as exc:
        hint = "pip install -e '.[postgres]'" if exc.name and exc.name.startswith("psycopg") else "pip install it"
        raise UsageError(f"storage {masked(url)!r} needs the database driver {exc.name!r}; {hint}") from None
    except Exception as exc:  # sqlalchemy raises many kinds; all mean "cannot use this URL"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot open storage {masked(url)!r}: {_without_password(reason, url)}") from None


class NewFile(NamedTuple):
    """A SQLite file that opening the storage will create, and the outermost of its folders that it will too."""

    path: Path
    made_from: Path | None


def new_sqlite_file(url: str) -> NewFile | None:
    """The SQLite file ``url`` names when it does not exist yet (opening the storage will create it), else None."""
    if not url.startswith("sqlite:///"):
        return None
    path = Path(url[len("sqlite:///") :])
    return None if not str(path) or path.exists() else NewFile(path, first_missing(path.parent))


def discard_if_empty(storage: RDBStorage, new: NewFile | None) -> None:
    """Remove the SQLite file that opening ``storage`` created, and the folders made for it, if no study was stored."""
    if new is None:  # the storage was there before, or is no SQLite file
        return
    try:
        if optuna.get_all_study_summaries(storage, include_best_trial=False):
            return
        storage.engine.dispose()
    except Exception:  # the file is unreadable or locked: keep it rather than lose anything
        return
    new.path.unlink(missing_ok=True)
    remove_unused(new.path.parent, new.made_from)


def load_existing(storage: RDBStorage, name: str) -> optuna.Study | None:
    """The study called ``name`` if it exists in ``storage``, else None."""
    names = {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    if name not in names:
        return None
    return optuna.load_study(study_name=name, storage=storage)


def _check_folder(path: Path, url: str) -> None:
    """A one-line error when a folder on the SQLite file's path is a file (``--studies-dir`` naming a file)."""
    missing = first_missing(path.parent)
    existing = path.parent if missing is None else missing.parent  # the innermost folder on the path that exists
    if not existing.is_dir():
        raise UsageError(
            f"{existing} is a file, not a folder, so it cannot hold storage {masked(url)!r}; "
            "pass a folder as --studies-dir (it is created if missing) or a SQLAlchemy URL as --storage"
        )


def open_study(name: str, url: str, hint: str | None = None) -> optuna.Study:
    """An existing study, or a one-line error saying what was looked for where.

    ``hint`` replaces the error's advice (by default: which of --study, --studies-dir, --storage to check), for
    commands that take the study's name from elsewhere (``serve --baseline`` reads it from the exports)."""
    if url.startswith("sqlite:///"):
        _check_folder(Path(url[len("sqlite:///") :]), url)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).exists():
        raise UsageError(f"no study database at {masked(url)}; {hint or 'check --study, --studies-dir and --storage'}")
    if url.startswith("sqlite:///") and not _holds_studies(Path(url[len("sqlite:///") :])):
        path = url[len("sqlite:///") :]
        raise UsageError(f"{path} is not an Optuna study database; {hint or 'check --study and --studies-dir'}")
    study = load_existing(open_storage(url), name)
    if study is None:
        raise UsageError(f"no study named {name!r} in {masked(url)}; {hint or 'check --study and --storage'}")
    return study


def _holds_studies(path: Path) -> bool:
    """Whether the SQLite file has Optuna's tables, read without writing (opening it as storage would add them)."""
    import sqlite3

    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            found = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='studies'").fetchone()
            return found is not None
    except sqlite3.Error:
        return False


SCHEMA_LOCK_KEY = 0x70727365  # "prse": the PostgreSQL advisory lock every worker takes to create the schema
"""Workers opening one fresh database at once would each create Optuna's tables; one of them would fail."""

_RACE_MARKS = ("already exists", "duplicate", "database is locked")
"""What drivers say when another worker created the same table a moment earlier (PostgreSQL raises
``DuplicateTable``, a ``ProgrammingError``, or a unique violation on ``pg_type``; SQLite an
``OperationalError``; MySQL error 1050), or held the file while doing so."""


class _SteadyHeartbeat(RDBStorage):
    """RDBStorage whose trial heartbeat survives a failed write.

    Optuna records a running trial's heartbeat from a thread that ends at the first exception, so one
    moment of an unreachable or busy database would silence the trial for good; after the grace period
    another worker marks it failed while it still runs, and its fine-tune is lost. Here a failed beat is
    tried again after 1 s and 3 s more, then left to the next beat (the grace period is two beats)."""

    RETRY_SECONDS = (1.0, 3.0)

    def record_heartbeat(self, trial_id: int) -> None:
        for wait in (*self.RETRY_SECONDS, None):
            try:
                super().record_heartbeat(trial_id)
                return
            except Exception:  # the database, for a moment
                if wait is None:
                    return  # the next beat tries again
                time.sleep(wait)


def _rdb_storage(url: str, heartbeat_seconds: int) -> RDBStorage:
    """RDBStorage, its schema created by one worker at a time (workers may open a fresh database together).

    On PostgreSQL a session advisory lock serializes the creation; on SQLite an exclusive ``flock``
    on the database's folder. Errors that still show the race (a worker of an older version that
    takes no lock) are retried; any other error is raised at once.
    """
    import sqlalchemy.exc

    for attempt in range(5):
        try:
            with _schema_lock(url):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return _SteadyHeartbeat(
                        url,
                        engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None,
                        heartbeat_interval=heartbeat_seconds,
                        grace_period=2 * heartbeat_seconds,
                        heartbeat_stale_trial_callback=RetryStaleTrial(),
                    )
        except sqlalchemy.exc.SQLAlchemyError as exc:
            if attempt == 4 or not _is_creation_race(exc):
                raise
            time.sleep(0.2 + 0.5 * attempt)
    raise AssertionError("unreachable")


def _is_creation_race(exc: Exception) -> bool:
    import sqlalchemy.exc

    text = str(getattr(exc, "orig", None) or exc).lower()
    return isinstance(exc, sqlalchemy.exc.IntegrityError) or any(mark in text for mark in _RACE_MARKS)


@contextmanager
def _schema_lock(url: str) -> Iterator[None]:
    """Held while this worker opens (and maybe creates) the storage: one worker at a time per database."""
    if url.startswith("sqlite:///"):
        folder = Path(url[len("sqlite:///") :]).parent
        try:
            fd: int | None = os.open(folder if str(folder) else ".", os.O_RDONLY)
        except OSError:  # an unusual path: RDBStorage says what is wrong with it
            fd = None
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            if fd is not None:
                os.close(fd)  # releases the lock
        return
    if not url.startswith("postgresql"):
        yield
        return
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": SCHEMA_LOCK_KEY})
    finally:
        engine.dispose()
