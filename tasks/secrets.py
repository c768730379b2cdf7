"""What counts as a secret, and how to keep it out of logs, reports and backups."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

_SECRET_PARTS = ("secret", "token", "password", "passwd", "credential")
_SECRET_ENDINGS = ("key", "keys", "pass", "pwd")
_LAST_WORD_ENDINGS = ("auth",)
REFERENCE = re.compile(r"\$\$?(?:\{[A-Za-z_]\w*(?::?\?[^}]*)?\}|[A-Za-z_]\w*)")
# Redis directives as redis-server arguments (`--requirepass x`) or as redis.conf lines
# written by a command (`echo "requirepass x" > r.conf`), and the generic `--password`.
SECRET_FLAGS = (
    "--requirepass",
    "--masterauth",
    "requirepass",
    "masterauth",
    "--password",
    "--pass",
)
REDIS_CLI_FLAGS = ("-a",)
# A flag and its value: `--requirepass x`, `--requirepass=x`, `-a "x"` (redis-cli itself
# refuses `-a=x`, but the file still holds the password, so that form counts too); a
# flag may follow a `\n` written for printf (`printf "port 1\nrequirepass x"`).
FLAG = (
    r"(?:(?<![\w-])|(?<=\\[nt]))"
    r"(?P<flag>(?:--)?requirepass|(?:--)?masterauth|--password|--pass|-a)"
)
FLAG_VALUE = r"(?P<value>\$\$?\{[^}]*\}|\"[^\"]*\"|'[^']*'|(?:[^\s\"',\]}\\]|\\(?![nt]))+)"
FLAG_ARGUMENT = re.compile(rf"{FLAG}(?P<sep>=|[ \t]+){FLAG_VALUE}")
URL_CREDENTIALS = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)([^/\s@\"'<>]+)@")
SECRET_VALUE = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----|(?i:\bbearer\s+[\w.~+/=-]{8,})")


def words(name: str) -> list[str]:
    """The lower-case words of a name: `apiKey` and `API_KEY` both give ['api', 'key']."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    return [word.lower() for word in re.split(r"[^A-Za-z0-9]+", spaced) if word]


def secret_name(name: str) -> bool:
    """A name that says it holds a secret: KEY, SECRET, TOKEN, PASSWORD, PASSWD,
    CREDENTIAL (any case, camelCase too: `apiKey`, `DB_PASS`, `requirepass`), or one
    ending in AUTH (`REDIS_AUTH`, `masterauth`, `REDISCLI_AUTH`; not `AUTH_MODE`)."""
    parts = words(name)
    return any(
        any(part in word for part in _SECRET_PARTS) or word.endswith(_SECRET_ENDINGS)
        for word in parts
    ) or bool(parts and parts[-1].endswith(_LAST_WORD_ENDINGS))


def reference(value: str) -> bool:
    """`${NAME}`, `${NAME:?message}`, `$NAME` (or compose's escaped `$$NAME`): the
    value is filled in from elsewhere, it holds no secret itself."""
    return REFERENCE.fullmatch(value.strip()) is not None


def secret_flag(argument: str, after_redis_cli: bool) -> bool:
    """A command-line argument whose next argument is a secret: `--requirepass`,
    `--masterauth` (redis-server takes any directive as `--name value`; bare, they are
    redis.conf lines), `--password`, and redis-cli's `-a`/`--pass` (`-a` only after
    `redis-cli`: elsewhere it means other things)."""
    return argument in SECRET_FLAGS or (after_redis_cli and argument in REDIS_CLI_FLAGS)


def secret_arguments(command: str) -> list[re.Match[str]]:
    """The `--flag value` / `--flag=value` secrets in a command line (`value` group),
    references like `--requirepass ${REDIS_PASSWORD}` excepted."""
    return [
        match
        for match in FLAG_ARGUMENT.finditer(command)
        if secret_flag(match["flag"], "redis-cli" in command[: match.start()])
        and not reference(match["value"].strip("\"'"))
    ]


def secret_value(value: str) -> bool:
    """A value that is or holds a secret: URL credentials, a private key, a bearer
    token, a command line with `--requirepass x` or `redis-cli -a x`."""
    urls = any(m.group(2) != "***" for m in URL_CREDENTIALS.finditer(value))
    return urls or bool(SECRET_VALUE.search(value)) or bool(secret_arguments(value))


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
