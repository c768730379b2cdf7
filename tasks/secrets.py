"""What counts as a secret, and how to keep it out of logs, reports and backups."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

_SECRET_PARTS = ("secret", "token", "password", "passwd", "credential")
_SECRET_ENDINGS = ("key", "keys", "pass", "pwd")
URL_CREDENTIALS = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)([^/\s@\"'<>]+)@")
SECRET_VALUE = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----|(?i:\bbearer\s+[\w.~+/=-]{8,})")


def words(name: str) -> list[str]:
    """The lower-case words of a name: `apiKey` and `API_KEY` both give ['api', 'key']."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    return [word.lower() for word in re.split(r"[^A-Za-z0-9]+", spaced) if word]


def secret_name(name: str) -> bool:
    """A name that says it holds a secret: KEY, SECRET, TOKEN, PASSWORD, PASSWD,
    CREDENTIAL (any case, camelCase too: `apiKey`, `DB_PASS`, `requirepass`)."""
    return any(
        any(part in word for part in _SECRET_PARTS) or word.endswith(_SECRET_ENDINGS)
        for word in words(name)
    )


def secret_value(value: str) -> bool:
    """A value that is or holds a secret: URL credentials, a private key, a bearer token."""
    urls = any(m.group(2) != "***" for m in URL_CREDENTIALS.finditer(value))
    return urls or bool(SECRET_VALUE.search(value))


def redact_urls(text: str) -> tuple[str, int]:
    """`scheme://user:pass@host` → `scheme://***@host`; returns the text and the count."""
    return URL_CREDENTIALS.subn(lambda m: f"{m.group(1)}***@", text)


def redact_url(url: str) -> str:
    """A connection URL safe to print: credentials replaced by '***'."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return parts._replace(netloc=f"***@{host}").geturl()
