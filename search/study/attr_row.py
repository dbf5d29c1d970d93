"""One study user attribute read and replaced as a row, so that of several workers exactly one wins.

Optuna's schema makes ``(study_id, key)`` unique in ``study_user_attributes``: inserting a key that
another worker inserted first fails, and an ``UPDATE ... WHERE value_json = old`` changes the row
only if nobody changed it since it was read. The creator record (:mod:`search.study.creator`) and
the promotion claims (:mod:`search.study.claims`) are both kept this way, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
from typing import Any

from optuna.storages import RDBStorage

__all__ = ["read_attr", "swap_attr"]


def read_attr(storage: RDBStorage, study_id: int, key: str) -> str | None:
    """The attribute's JSON text as stored, or None when there is none."""
    import sqlalchemy

    with storage.engine.connect() as conn:
        row = conn.execute(
            sqlalchemy.text("SELECT value_json FROM study_user_attributes WHERE study_id = :s AND key = :k"),
            {"s": study_id, "k": key},
        ).first()
    return None if row is None else row[0]


def swap_attr(
    storage: RDBStorage,
    study_id: int,
    key: str,
    old: str | None,
    new: dict[str, Any],
    *,
    busy_is_lost: bool = False,
) -> str | None:
    """Insert (``old`` None) or replace the row ``old`` by ``new`` if nobody changed it; the new text, or None
    when another worker inserted or changed it first. ``busy_is_lost``: SQLite busy past its timeout counts as
    lost too (the caller tries again later) instead of raising."""
    import sqlalchemy
    import sqlalchemy.exc

    text = json.dumps(new)
    try:
        with storage.engine.begin() as conn:
            if old is None:
                conn.execute(
                    sqlalchemy.text(
                        "INSERT INTO study_user_attributes (study_id, key, value_json) VALUES (:s, :k, :v)"
                    ),
                    {"s": study_id, "k": key, "v": text},
                )
                return text
            changed = conn.execute(
                sqlalchemy.text(
                    "UPDATE study_user_attributes SET value_json = :v"
                    " WHERE study_id = :s AND key = :k AND value_json = :o"
                ),
                {"s": study_id, "k": key, "v": text, "o": old},
            ).rowcount
    except sqlalchemy.exc.IntegrityError:  # another worker inserted it first
        return None
    except sqlalchemy.exc.OperationalError:
        if busy_is_lost:
            return None
        raise
    return text if changed == 1 else None
