"""What counts as a secret, and how to keep it out of logs, reports and backups."""

from __future__ import annotations

import re

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


class AmbiguousUrl(ValueError):
    """A URL whose credentials hold an unencoded special character: where the host
    starts cannot be told, so it is neither used nor shown."""


URL_ENCODING_FIX = (
    "percent-encode special characters in the user name and password: "
    "# → %23, / → %2F, ? → %3F, @ → %40, % → %25"
)
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]*\]|[^:\[\]]*)(:[0-9]*)?")
_CREDENTIAL_PARAMETERS = ("user", "username")


def _split(url: str) -> tuple[str, str, str] | None:
    """(scheme, authority, rest) of `scheme://authority/rest`, None without a scheme."""
    scheme, sep, rest = url.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        return None
    end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    return scheme, rest[:end], rest[end:]


def url_problem(url: str) -> str | None:
    """Why the credentials of `url` cannot be told apart from the rest, or None.

    An `@` after the host part means a `#`, `/` or `?` in the password cut the URL
    short; a second `@` in the host part means an unencoded `@`. Parsers then read
    a different host (or none) and would show the password as a host, path or port.
    """
    parts = _split(url)
    if parts is None:
        return None
    _scheme, authority, rest = parts
    if "@" in rest or authority.count("@") > 1:
        return (
            "its user name or password holds an unencoded '#', '/', '?' or '@', so "
            f"where the host starts cannot be told: {URL_ENCODING_FIX}"
        )
    return None


def check_url(url: str, what: str) -> str:
    """`url` when its credentials parse unambiguously; else AmbiguousUrl, a message
    naming `what` and the fix and holding nothing of the URL past its scheme."""
    problem = url_problem(url)
    if problem:
        parts = _split(url)
        scheme = f" ({parts[0]}://…)" if parts else ""
        raise AmbiguousUrl(f"{what}{scheme} cannot be used: {problem}")
    return url


def url_server(url: str) -> str:
    """`host:port` of a URL (credentials, path and query left out), for lock names."""
    parts = _split(check_url(url, "the URL"))
    if parts is None:
        return redact_url(url)
    host = parts[1].rpartition("@")[2]
    return host if _HOST_PORT.fullmatch(host) else "***"


def _redact_rest(rest: str) -> str:
    """Path kept; values of credential-like query parameters and any fragment hidden."""
    rest, hash_, fragment = rest.partition("#")
    path, question, query = rest.partition("?")
    pairs = []
    for pair in re.split(r"([&;])", query):
        name, equals, _value = pair.partition("=")
        hide = equals and (secret_name(name) or name.lower() in _CREDENTIAL_PARAMETERS)
        pairs.append(f"{name}=***" if hide else pair)
    return path + question + "".join(pairs) + (hash_ + "***" if fragment else hash_)


def redact_url(url: str) -> str:
    """A URL safe to print, whatever the input: user and password become '***', as do
    credential query parameters (`?password=`) and fragments. A URL whose host cannot
    be told from its credentials (see `url_problem`) shows only its scheme."""
    parts = _split(url)
    if parts is None:
        return url if _HOST_PORT.fullmatch(url) and "/" not in url else "***"
    scheme, authority, rest = parts
    if url_problem(url):
        return f"{scheme}://***"
    _user, at, host = authority.rpartition("@")
    if not _HOST_PORT.fullmatch(host):  # `redis://:secret` (no host): ':secret' is no port
        host = "***"
    return f"{scheme}://{'***@' if at else ''}{host}{_redact_rest(rest)}"


def carries_credentials(url: str) -> bool:
    """True when printing `url` as is would show a credential."""
    return redact_url(url) != url


def _any_case(word: str) -> str:
    return "".join(f"[{c.upper()}{c.lower()}]" for c in word)


_QUERY_WORDS = (*_SECRET_PARTS, *_SECRET_ENDINGS, *_LAST_WORD_ENDINGS, *_CREDENTIAL_PARAMETERS)
_SHORTEST = sorted({w for w in _QUERY_WORDS if not any(o != w and o in w for o in _QUERY_WORDS)})
# `carries_credentials` as a JSON Schema `pattern` (the same in Python and ECMAScript, for
# the Prefect server and its UI): no user info or `@` at all, no fragment, no password
# without a host (`redis://:secret`), no query parameter whose name holds a secret's word
# (broader than `secret_name`: `?monkey=` too).
CREDENTIAL_FREE_URL = (
    r"^(?![A-Za-z][A-Za-z0-9+.-]*://[^/?#\[]*:[^/?#]*[^0-9/?#])"
    rf"(?!.*[?&;][^=&;#]*(?:{'|'.join(map(_any_case, _SHORTEST))})[^=&;#]*=)"
    r"[^@#]*$"
)
