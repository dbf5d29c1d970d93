"""Storage URLs: their secrets masked for every message, log and record; their driver made explicit.

A PostgreSQL password can sit in the URL's own place (``postgresql://user:PW@host/db``) or in a
query parameter (``...?password=PW``, which libpq reads too): both are masked. A command line is
recorded (export cards, their artifacts) with every URL in it masked the same way. A URL without
a password is what a suggested command shows: libpq takes the password from ``PGPASSWORD`` (or
``~/.pgpass``) when the URL has none.

SQLAlchemy 2.1 opens a bare ``postgresql://`` with the ``psycopg`` (3) driver; this project's
``postgres`` extra installs ``psycopg2``. :func:`with_driver` names the installed one.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Sequence
from urllib.parse import parse_qsl, urlencode

__all__ = [
    "PASSWORD_ENV",
    "has_secret",
    "masked",
    "masked_command",
    "password_in_env",
    "with_driver",
    "without_password",
    "without_secrets",
]

PASSWORD_ENV = "PGPASSWORD"
"""Where libpq (psycopg2, psycopg) takes the password from when the URL carries none."""

MASK = "***"

_SECRET_KEYS = re.compile(r"pass|pwd|secret|token", re.IGNORECASE)
"""Query parameters whose values are secrets (password, sslpassword, ...)."""


def _parse(url: str):  # sqlalchemy's URL, imported lazily
    from sqlalchemy.engine import make_url

    return make_url(url)


def _secret_query(url: str) -> list[str]:
    query = url.partition("?")[2]
    return [value for key, value in parse_qsl(query, keep_blank_values=True) if _SECRET_KEYS.search(key) and value]


def _mask_query(url: str, replacement: str | None) -> str:
    """``url`` with its secret query parameters' values replaced (``replacement``) or dropped (None)."""
    base, sep, query = url.partition("?")
    if not sep:
        return url
    pairs = parse_qsl(query, keep_blank_values=True)
    if not any(_SECRET_KEYS.search(key) for key, _ in pairs):
        return url
    secret = [bool(_SECRET_KEYS.search(k)) for k, _ in pairs]
    kept = [
        (k, replacement if hidden else v)
        for (k, v), hidden in zip(pairs, secret, strict=True)
        if replacement or not hidden
    ]
    return f"{base}?{urlencode(kept, safe='*/:')}" if kept else base


def _unencoded_password(url: str) -> str | None:
    """A password holding an unencoded ``@`` (``//user:p@ss@host``), which parsers split at its first ``@``: the
    host is what follows the last ``@``. None when the URL has no such password."""
    netloc = url.partition("://")[2].split("/", 1)[0].split("?", 1)[0]
    userinfo = netloc.rpartition("@")[0]
    if "@" not in userinfo or ":" not in userinfo:
        return None
    return userinfo.partition(":")[2]


def _own_password(url: str) -> str | None:
    """The password in the URL's own place (an unencoded ``@`` in it included), or None."""
    raw = _unencoded_password(url)
    if raw is not None:
        return raw
    try:
        password = _parse(url).password
    except Exception:
        return None
    return None if password is None else str(password)


def masked(url: str) -> str:
    """``url`` with its password (in its own place or as a query parameter) replaced by ``***``."""
    raw = _unencoded_password(url)
    if raw is not None:
        return _mask_query(url.replace(f":{raw}@", f":{MASK}@", 1), MASK)
    try:
        parsed = _parse(url)
    except Exception:  # not a URL SQLAlchemy can parse: hide whatever stands between ':' and '@'
        return _mask_query(re.sub(r"(//[^/:@]*:)[^/@]*@", rf"\1{MASK}@", url), MASK)
    own = parsed.render_as_string(hide_password=True) if parsed.password else url
    return _mask_query(own, MASK)


def without_password(text: str, url: str) -> str:
    """``text`` (an error from a driver) with the URL's secrets, wherever they appear in it, masked."""
    text = text.replace(url, masked(url))
    secrets = _secret_query(url)
    password = _own_password(url)
    if password:
        secrets.append(password)
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, MASK)
    for piece in (password or "").split("@")[1:]:  # a driver names "ss@host" (of "p@ss@host") as the host
        if piece:
            text = text.replace(f"{piece}@", f"{MASK}@")
    return text


def without_secrets(url: str) -> str:
    """``url`` with no password at all (libpq then reads :data:`PASSWORD_ENV`): for a command to paste."""
    raw = _unencoded_password(url)
    if raw is not None:
        return _mask_query(url.replace(f":{raw}@", "@", 1), None)
    try:
        parsed = _parse(url)
    except Exception:
        return _mask_query(re.sub(r"(//[^/:@]*):[^/@]*@", r"\1@", url), None)
    if parsed.password is not None:
        url = parsed._replace(password=None).render_as_string(hide_password=False)  # set() keeps a None
    return _mask_query(url, None)


def has_secret(url: str) -> bool:
    """Whether ``url`` carries a password (own place or query parameter)."""
    return without_secrets(url) != url


def password_in_env(url: str) -> tuple[str, dict[str, str]]:
    """``url`` without its PostgreSQL password, and the environment that hands it to libpq instead, for a command
    this process starts (a command line is visible to every user through ``ps``); ``(url, {})`` where the URL
    has no password or a secret libpq could not take from the environment."""
    scheme = url.partition("://")[0].split("+")[0]
    if scheme not in ("postgresql", "postgres") or not has_secret(url):
        return url, {}
    own = _own_password(url)
    query = [(k, v) for k, v in parse_qsl(url.partition("?")[2], keep_blank_values=True) if _SECRET_KEYS.search(k)]
    if [k for k, _ in query if k != "password"]:  # sslpassword and the like: no environment variable takes them
        return url, {}
    password = own if own is not None else query[0][1]
    return without_secrets(url), {PASSWORD_ENV: password}


def masked_command(argv: Sequence[str]) -> list[str]:
    """A command line with every URL's secrets masked (``--storage URL`` and ``--storage=URL`` alike)."""
    out = []
    for arg in argv:
        option, eq, value = arg.partition("=") if arg.startswith("--") and "=" in arg else ("", "", arg)
        if "://" in value:
            value = masked(value)
        out.append(f"{option}{eq}{value}" if eq else value)
    return out


def with_driver(url: str) -> str:
    """``url`` with an installed PostgreSQL driver named when it names none (``postgresql://`` → ``+psycopg2``)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        return url
    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2://{rest}"
    return url
