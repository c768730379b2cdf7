"""The secrets a config backup withheld inside its files, as named slots a restore
fills: never is the literal `<redacted>` restored.

backup-config replaces a secret in a file by `<redacted>` (a URL's credentials by
`***`): tasks/config/redact.py. Each such place is a slot named after its file and
the key it stood under (`redis/redis.conf`'s `requirepass` → REDIS_REDIS_CONF_REQUIREPASS;
the second `password:` of prometheus.yml → PROMETHEUS_YML_PASSWORD_2; in an env file
the variable itself), so the operator supplies it under that name in
`secrets_env_file`, and the restore writes it back in the file's own syntax. The
names are derived from the stored text alone, so backups made before slots existed
are restored the same way.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from urllib.parse import quote

from tasks.config.redact import PLACEHOLDER
from tasks.docker.project import dotenv_value

_URL_SLOT = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)\*\*\*@")
# The key a placeholder stands under on its line: `password: "<redacted>"`,
# `"basicAuthPassword": "<redacted>"`, `requirepass <redacted>`, `--requirepass <redacted>`,
# `user backup on ><redacted>`, `TOKEN=<redacted>`.
_KEY = re.compile(r"""(?:^|[\s{,\[])-{0,2}["']?([A-Za-z_][\w.-]*)["']?\s*[:=]?\s*["']?[>#<!]?$""")
_PLAIN = re.compile(r"[A-Za-z0-9._~+/=@%^*!?,-]+")


@dataclass(frozen=True)
class Slot:
    """One secret withheld in a stored config file."""

    name: str  # the variable that holds it in secrets_env_file
    file: str  # the file, relative to the project
    line: int
    key: str  # what the file calls it


def _key(line: str, start: int) -> str:
    """What the file calls the secret at `start`: the key or directive before it; for
    a redis.conf ACL line, the user and whether it is a password (`>`) or a hash."""
    words = line.split()
    if len(words) > 1 and words[0] == "user":
        return f"user {words[1]} {'password' if line[start - 1 : start] == '>' else 'hash'}"
    match = _KEY.search(line[:start])
    return match[1] if match else "secret"


def _slug(relative: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", relative).strip("_").upper()


def find_slots(relative: str, text: str, env_file: bool = False) -> list[Slot]:
    """The withheld secrets of one stored file, in order, each with its name."""
    slots: list[Slot] = []
    taken: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        places = [(m.start(), "url credentials") for m in _URL_SLOT.finditer(line)]
        places += [(m.start(), "") for m in re.finditer(re.escape(PLACEHOLDER), line)]
        for start, key in sorted(places):
            key = key or _key(line, start)
            base = key.upper().replace(".", "_").replace("-", "_") if env_file else None
            base = base or f"{_slug(relative)}_{re.sub(r'[^A-Za-z0-9]+', '_', key).upper()}"
            taken[base] = taken.get(base, 0) + 1
            name = base if taken[base] == 1 else f"{base}_{taken[base]}"
            slots.append(Slot(name, relative, number, key))
    return slots


def _in_syntax(relative: str, line: str, at: int, value: str, env_file: bool) -> str:
    """`value` written where the placeholder starts (`at` in `line`), in the file's
    own syntax: escaped inside quotes, quoted where a plain word would not read back
    (an env file's as compose reads it: `dotenv_value`)."""
    if env_file:
        return dotenv_value(value)
    before = line[at - 1] if at else ""
    if before == '"':
        return json.dumps(value)[1:-1]
    if before == "'":
        return value.replace("'", "''")
    if _PLAIN.fullmatch(value):
        return value
    return json.dumps(value)  # a double-quoted string in YAML, JSON and redis.conf


def fill_slots(relative: str, text: str, values: dict[str, str], env_file: bool = False) -> str:
    """The stored text with each slot's placeholder replaced by its value (`values`
    must hold every slot's name: `missing_slots` says which it lacks)."""
    slots = iter(find_slots(relative, text, env_file))
    out = []
    for line in text.splitlines(keepends=True):
        while True:
            url = _URL_SLOT.search(line)
            plain = line.find(PLACEHOLDER)
            if url is None and plain < 0:
                break
            slot = next(slots)
            if url is not None and (plain < 0 or url.start() < plain):
                user, _, password = values[slot.name].partition(":")
                credentials = quote(user, safe="") + (
                    ":" + quote(password, safe="") * bool(password)
                )
                line = line[: url.end() - 4] + credentials + "@" + line[url.end() :]
            else:
                written = _in_syntax(relative, line, plain, values[slot.name], env_file)
                line = line[:plain] + written + line[plain + len(PLACEHOLDER) :]
        out.append(line)
    return "".join(out)


def missing_slots(slots: list[Slot], values: dict[str, str]) -> list[Slot]:
    return [slot for slot in slots if slot.name not in values]
