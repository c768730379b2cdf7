"""Secrets out of config files: the stored copy of a YAML or JSON file without them.

What is replaced (tasks/common/secrets.py says what a secret is):
- the value of a secret-looking key, whatever its type (`GATEWAY_API_TOKEN: ...`,
  `REDIS_PASSWORD: 84736251`, `- DB_PASSWORD=...`, basic_auth `password: 20240917`,
  `"basicAuthPassword": "x"` in a dashboard), and every value under Grafana's
  `secureJsonData`;
- the argument after a secret flag in a command line, string or list form
  (`redis-server --requirepass x`, `["redis-cli", "-a", "x", "ping"]`);
- the same in comments (`# GATEWAY_API_TOKEN: sk-live-...`): replaced in the comment;
- in redis.conf, the arguments of `requirepass`, `masterauth`… and the passwords of
  `user` ACL lines;
- credentials inside URLs (`scheme://user:pass@host` becomes `scheme://***@host`).
Every other byte, comment and the layout are kept. In compose files the replacement
is `${NAME:?secret withheld by backup-config}`, so a restored stack refuses to start
until the secret is supplied again instead of running with a wrong value. When a
secret hides where lines cannot reach (flow mappings, anchors, odd quoting), the
parsed document is written out again without it: the parsed result is always
checked, so a secret is never kept because the in-place edit missed it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatch
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from tasks.common.secrets import (
    FLAG,
    FLAG_VALUE,
    SECRET_VALUE,
    redact_urls,
    reference,
    secret_arguments,
    secret_flag,
    secret_name,
    secret_value,
    words,
)

COMPOSE_PATTERNS = (
    "docker-compose.yml",
    "docker-compose.yaml",
    "docker-compose.*.yml",
    "docker-compose.*.yaml",
    "compose.yml",
    "compose.yaml",
    "compose.*.yml",
    "compose.*.yaml",
)
PLACEHOLDER = "<redacted>"
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_PATH_WORDS = ("file", "path", "dir")  # `password_file: /run/secrets/x` names a file
_SECURE_KEYS = ("securejsondata",)  # Grafana: every value below it is a secret
_FLAG_VARIABLES = {"-a": "REDISCLI_AUTH", "--pass": "REDISCLI_AUTH"}  # redis-cli reads it
_ENV_ITEM = re.compile(r"([A-Za-z_][\w.]*)=(.*)", re.S)
_ENV_NAME = re.compile(r"[A-Za-z_]\w*")
_MAPPING_LINE = re.compile(
    r"(?P<head>(?P<indent>[ ]*)(?:-[ ]+)?(?P<q>[\"']?)(?P<key>[\w.-]+)(?P=q)[ ]*:)"
    r"(?P<gap>[ ]+)(?P<value>\S.*?)[ ]*$"
)
_LIST_LINE = re.compile(
    r"(?P<head>[ ]*-[ ]+(?P<q>[\"']?))(?P<key>[A-Za-z_][\w.]*)=(?P<value>.*?)(?P=q)[ ]*$"
)
_BLOCK_KEY = re.compile(r"[ ]*(?:-[ ]+)?[\"']?(?P<key>[\w.-]+)[\"']?[ ]*:[ ]*(?:#.*)?")
_LIST_ITEM = re.compile(
    r"(?P<head>[ ]*-[ ]+)(?P<item>\"(?:[^\"\\]|\\.)*\"|'[^']*'|[^\s\"'#][^#]*?)"
    r"(?P<tail>[ ]*(?:[ ]#.*)?)"
)
# On a line a flag's value may also follow a flow sequence's `", "`.
_LINE_ARGUMENT = re.compile(rf"{FLAG}(?P<sep>=|[ \t]+|[\"']?[ \t]*,[ \t]*[\"']?){FLAG_VALUE}")
_COMMENT_KEY = re.compile(r"(?P<key>[A-Za-z_][\w.-]*)[\"']?[ \t]*[:=][ \t]*(?=\S)")
_JSON_PAIR = re.compile(
    r"\"(?P<key>(?:[^\"\\]|\\.)*)\"\s*:\s*(?P<value>\"(?:[^\"\\]|\\.)*\"|-?\d[\w.+-]*)"
)
_JSON_SECURE = re.compile(r"\"secureJsonData\"\s*:\s*\{[^{}]*\}", re.IGNORECASE)


# ------------------------------------------------------------------ what is replaced


@lru_cache(maxsize=4096)
def _secret_key(key: str) -> bool:
    """A key whose value is a secret (`password_file`, `key_file` name files).
    Cached: a dashboard repeats the same few keys thousands of times."""
    parts = words(key)
    return secret_name(key) and not (parts and parts[-1] in _PATH_WORDS)


def _scalar(value: object) -> bool:
    """A value a secret can be written as: text, a number, a date (a boolean cannot)."""
    return value is not None and not isinstance(value, (dict, list, bool))


def _kept(value: object) -> bool:
    """A value that needs no replacing: empty, a reference, or already replaced."""
    if not isinstance(value, str):
        return False
    return not value.strip() or value == PLACEHOLDER or reference(value)


def _hides_secret(key: str, value: object, secure: bool = False) -> bool:
    """Whether the scalar of `key: value` (or `- KEY=value`) must be replaced whole:
    the key names a secret (whatever the value's type: `REDIS_PASSWORD: 84736251`),
    the value is one, or it sits under Grafana's secureJsonData."""
    if not _scalar(value) or _kept(value):
        return False
    if secure or _secret_key(key):
        return True
    return isinstance(value, str) and bool(SECRET_VALUE.search(value))


def _placeholder(key: str, compose: bool) -> str:
    if compose and _ENV_NAME.fullmatch(key):
        return f"${{{key}:?secret withheld by backup-config}}"
    return PLACEHOLDER


def _argument_placeholder(flag: str, compose: bool) -> str:
    """`--requirepass x` → `--requirepass ${REQUIREPASS:?...}`; redis-cli's `-a x`
    → `${REDISCLI_AUTH:?...}` (the variable redis-cli itself reads)."""
    name = _FLAG_VARIABLES.get(flag, flag.lstrip("-").upper().replace("-", "_"))
    return _placeholder(name, compose)


def _redact_arguments(command: str, compose: bool) -> tuple[str, list[str]]:
    """A command line (string form) with its secret arguments replaced, and their flags."""
    found = secret_arguments(command)
    for match in reversed(found):
        start, end = match.span("value")
        command = command[:start] + _argument_placeholder(match["flag"], compose) + command[end:]
    return command, [match["flag"] for match in found]


# ------------------------------------------------------------------ the parsed walk

_SHORTEST_COPY = 4  # a shorter secret is not searched for as text (it would match anywhere)


@dataclass
class Findings:
    """What the walk replaced: where (paths, for the report) and which values, so a
    copy elsewhere (a YAML anchor under an innocent key) is caught too."""

    paths: list[str] = field(default_factory=list)
    values: set[str] = field(default_factory=set)
    known: frozenset[str] = frozenset()  # replace these values wherever they appear

    def add(self, path: str, value: object) -> None:
        self.paths.append(path)
        if _scalar(value):
            self.values.add(str(value).strip("\"'"))

    def copies_in(self, text: str) -> bool:
        """Whether a replaced value still appears in the text."""
        return any(len(value) >= _SHORTEST_COPY and value in text for value in self.values)


def _scrub(node: Any, path: str, compose: bool, found: Findings, secure: bool = False) -> Any:
    """A copy of parsed YAML/JSON with every secret replaced; `found` gets them."""
    if isinstance(node, dict):
        clean = {}
        for key, value in node.items():
            label = f"{path}.{key}" if path else str(key)
            if _hides_secret(str(key), value, secure):
                found.add(label, value)
                clean[key] = _placeholder(str(key), compose)
            else:
                inner = secure or str(key).lower() in _SECURE_KEYS
                clean[key] = _scrub(value, label, compose, found, inner)
        return clean
    if isinstance(node, list):
        return _scrub_list(node, path, compose, found, secure)
    if isinstance(node, str) and secret_value(node):
        text, _count = redact_urls(node)
        arguments = secret_arguments(text)
        text, flags = _redact_arguments(text, compose)
        found.add(f"{path} ({', '.join(flags)})" if flags else path, None)
        found.values.update(match["value"].strip("\"'") for match in arguments)
        return PLACEHOLDER if SECRET_VALUE.search(text) else text
    if _scalar(node) and not _kept(node) and (secure or str(node) in found.known):
        found.add(path, node)
        return PLACEHOLDER
    return node


def _scrub_list(items: list[Any], path: str, compose: bool, found: Findings, secure: bool) -> Any:
    """A list, where the item after a secret flag (`--requirepass`, `-a` after
    `redis-cli`) is a secret too: the exec form of `command:` and healthcheck `test:`."""
    clean: list[Any] = []
    after_cli = False
    for index, item in enumerate(items):
        flag = items[index - 1] if index else None
        if isinstance(flag, str) and secret_flag(flag, after_cli) and _scalar(item):
            if not _kept(item):
                found.add(f"{path} ({flag})", item)
                item = _argument_placeholder(flag, compose)
            clean.append(item)
        else:
            clean.append(_scrub_item(item, f"{path}[{index}]", path, compose, found, secure))
        after_cli = after_cli or (isinstance(item, str) and "redis-cli" in item)
    return clean


def _scrub_item(
    item: Any, label: str, parent: str, compose: bool, found: Findings, secure: bool
) -> Any:
    match = _ENV_ITEM.fullmatch(item) if isinstance(item, str) else None
    if match and _hides_secret(match[1], match[2], secure):
        found.add(f"{parent}.{match[1]}", match[2])
        return f"{match[1]}={_placeholder(match[1], compose)}"
    return _scrub(item, label, compose, found, secure)


def _load_all(text: str) -> list[Any]:
    """The YAML documents of a text, parsed safely (libyaml when installed: several
    times faster; a text it cannot encode raises ValueError)."""
    return list(yaml.load_all(text, Loader=_YAML_LOADER))


def _yaml_secrets(text: str, compose: bool) -> Findings | None:
    """The secrets left in a YAML text; None when it does not parse."""
    try:
        documents = _load_all(text)
    except (yaml.YAMLError, ValueError):
        return None
    found = Findings()
    for document in documents:
        _scrub(document, "", compose, found)
    return found


# ------------------------------------------------------------------- in-place edits


def _scalar_text(value: str) -> object:
    """The scalar a YAML value text stands for, or None (not a scalar, not parseable)."""
    try:
        parsed = yaml.load(value, Loader=_YAML_LOADER)
    except (yaml.YAMLError, ValueError):
        return None
    return parsed if _scalar(parsed) else None


def _redact_line_arguments(line: str, compose: bool) -> tuple[str, list[str]]:
    """One line with the values after secret flags replaced: a string command
    (`redis-server --requirepass x`) or a flow sequence (`["redis-cli", "-a", "x"]`)."""
    flags: list[str] = []

    def replace(match: re.Match[str]) -> str:
        value = match["value"].strip("\"'")
        if not secret_flag(match["flag"], "redis-cli" in line[: match.start()]) or _kept(value):
            return match[0]
        flags.append(match["flag"])
        placeholder = _argument_placeholder(match["flag"], compose)
        if "," in match["sep"] and match["sep"][-1] not in "\"'" and match["value"][0] not in "\"'":
            placeholder = json.dumps(placeholder)  # a bare flow item: `{` must be quoted there
        return f"{match['flag']}{match['sep']}{placeholder}"

    return _LINE_ARGUMENT.sub(replace, line), flags


def _comment_start(body: str) -> int | None:
    """Where a line's YAML comment starts (`#` after a blank, outside quotes)."""
    quote = None
    escaped = False
    for index, char in enumerate(body):
        if quote:
            if escaped:
                escaped = False
            elif char == "\\" and quote == '"':
                escaped = True
            elif char == quote:
                quote = None
        elif char in "\"'" and (index == 0 or body[index - 1] in " \t[{,:-"):
            quote = char
        elif char == "#" and (index == 0 or body[index - 1] in " \t"):
            return index
    return None


def _redact_comment(comment: str, compose: bool) -> tuple[str, list[str]]:
    """A comment with secrets replaced: what follows a secret key (`# API_TOKEN: x`,
    `# - DB_PASSWORD=x`) up to the line's end, and secret command arguments."""
    comment, flags = _redact_line_arguments(comment, compose)
    for match in _COMMENT_KEY.finditer(comment):
        value = comment[match.end() :].strip()
        if _secret_key(match["key"]) and not _kept(value.strip("\"',")):
            replacement = _placeholder(match["key"], compose)
            return comment[: match.end()] + replacement, [*flags, match["key"]]
    return comment, flags


def _redact_comments(text: str, compose: bool) -> tuple[str, list[str]]:
    """Every comment of a YAML text with its secrets replaced; names say which line."""
    out: list[str] = []
    names: list[str] = []
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        body = line.rstrip("\r\n")
        start = _comment_start(body)
        if start is not None:
            comment, found = _redact_comment(body[start:], compose)
            names += [f"{name} (comment, line {number})" for name in found]
            line = body[:start] + comment + line[len(body) :]
        out.append(line)
    return "".join(out), names


def _redact_lines(text: str, compose: bool) -> tuple[str, list[str]]:
    """Replace secret values line by line, keeping everything else byte for byte
    (mapping `KEY: value`, list `- KEY=value`, block scalars `KEY: |`, command lines
    and argument lists, values under `secureJsonData:`)."""
    out: list[str] = []
    names: list[str] = []
    skip_deeper_than: int | None = None
    secure_deeper_than: int | None = None
    argv_indent: int | None = None  # the block list being read as a command's arguments
    after_cli, pending_flag = False, None
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        ending = line[len(body) :]
        indent = len(body) - len(body.lstrip(" "))
        blank = not body.strip() or body.lstrip().startswith("#")
        if skip_deeper_than is not None:
            if not body.strip() or indent > skip_deeper_than:
                continue  # the block scalar holding the secret
            skip_deeper_than = None
        if secure_deeper_than is not None and not blank and indent <= secure_deeper_than:
            secure_deeper_than = None
        secure = secure_deeper_than is not None
        listed = _LIST_LINE.match(body)
        if listed and _hides_secret(listed["key"], listed["value"], secure):
            names.append(listed["key"])
            key = listed["key"]
            out.append(f"{listed['head']}{key}={_placeholder(key, compose)}{listed['q']}{ending}")
            continue
        mapped = _MAPPING_LINE.match(body)
        if mapped:
            key, value = mapped["key"], mapped["value"]
            block = (secure or _secret_key(key)) and re.fullmatch(
                r"[|>][-+0-9]*([ ]+#.*)?", value
            ) is not None
            candidate = secure or _secret_key(key) or SECRET_VALUE.search(value)
            if block or (candidate and _hides_secret(key, _scalar_text(value), secure)):
                names.append(key)
                replacement = json.dumps(_placeholder(key, compose))
                out.append(f"{mapped['head']}{mapped['gap']}{replacement}{ending}")
                skip_deeper_than = len(mapped["indent"]) if block else None
                continue
        opened = _BLOCK_KEY.fullmatch(body)
        if opened and opened["key"].lower() in _SECURE_KEYS:
            secure_deeper_than = indent
        item = None if (mapped or listed) else _LIST_ITEM.fullmatch(body)
        if item:
            if argv_indent != indent:
                argv_indent, after_cli, pending_flag = indent, False, None
            value = _scalar_text(item["item"]) if pending_flag else None
            if pending_flag and _scalar(value) and not _kept(value):
                names.append(pending_flag)
                placeholder = json.dumps(_argument_placeholder(pending_flag, compose))
                out.append(f"{item['head']}{placeholder}{item['tail']}{ending}")
                pending_flag = None
                continue
            text = item["item"].strip("\"'")  # flags need no decoding
            pending_flag = text if secret_flag(text, after_cli) else None
            after_cli = after_cli or "redis-cli" in text
        elif not blank:
            argv_indent = None
        body, flags = _redact_line_arguments(body, compose)
        names += flags
        out.append(body + ending)
    return "".join(out), names


# ---------------------------------------------------------------------- the files


def redact_yaml(text: str, compose: bool) -> tuple[str, list[str], str]:
    """A YAML file with its secrets replaced: (text, key paths replaced, how).

    In place when possible (comments and layout kept); when a secret hides where
    lines cannot reach (flow mappings, anchors), the parsed document is rewritten
    without it; a file that does not parse is redacted line by line."""
    text, count = redact_urls(text)
    urls = [f"{count} URL credential(s)"] if count else []
    text, comments = _redact_comments(text, compose)
    found = _yaml_secrets(text, compose)
    if found is not None and not found.paths:
        return text, urls + comments, "in place"
    redacted, names = _redact_lines(text, compose)
    if found is None:
        return redacted, urls + names + comments, "line by line (not valid YAML)"
    left = _yaml_secrets(redacted, compose)
    if left is not None and not left.paths and not found.copies_in(redacted):
        return redacted, urls + found.paths + comments, "in place"
    known = Findings(known=frozenset(found.values))
    clean = [_scrub(doc, "", compose, known) for doc in _load_all(text)]
    rewritten = yaml.safe_dump_all(clean, sort_keys=False, default_flow_style=False)
    return rewritten, urls + found.paths + comments, "rewritten (comments and layout not kept)"


def _json_secrets(text: str) -> tuple[Any, Findings | None]:
    """The parsed JSON document and its secrets (None: not valid JSON)."""
    try:
        document = json.loads(text)
    except ValueError:
        return None, None
    found = Findings()
    _scrub(document, "", False, found)
    return document, found


def _json_literal(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return text  # not a JSON number (`0x5f…`): count it as text


def _redact_json_text(text: str) -> tuple[str, list[str]]:
    """JSON with secret values replaced in place: `"basicAuthPassword": "x"`, every
    value in a `"secureJsonData": {...}` object, command arguments."""
    names: list[str] = []

    def pairs(secure: bool) -> Callable[[re.Match[str]], str]:
        def replace(match: re.Match[str]) -> str:
            key = str(_json_literal(f'"{match["key"]}"'))
            if not (secure or _secret_key(key) or SECRET_VALUE.search(match["value"])):
                return match[0]  # the common case, decided without decoding the value
            if not _hides_secret(key, _json_literal(match["value"]), secure):
                return match[0]
            names.append(key)
            return match[0][: match.start("value") - match.start()] + json.dumps(PLACEHOLDER)

        return replace

    text = _JSON_SECURE.sub(lambda block: _JSON_PAIR.sub(pairs(True), block[0]), text)
    text = _JSON_PAIR.sub(pairs(False), text)
    lines: list[str] = []
    for line in text.splitlines(keepends=True):
        line, flags = _redact_line_arguments(line, compose=False)
        names += flags
        lines.append(line)
    return "".join(lines), names


def redact_json(text: str) -> tuple[str, list[str], str]:
    """A JSON file (a Grafana dashboard or datasource) with its secrets replaced:
    in place when possible, else written out again from the parsed document."""
    text, count = redact_urls(text)
    urls = [f"{count} URL credential(s)"] if count else []
    document, found = _json_secrets(text)
    if found is not None and not found.paths:
        return text, urls, "in place"
    redacted, names = _redact_json_text(text)
    if found is None:
        return redacted, urls + names, "by pattern (not valid JSON)"
    left = _json_secrets(redacted)[1]
    if left is not None and not left.paths and not found.copies_in(redacted):
        return redacted, urls + found.paths, "in place"
    clean = _scrub(document, "", False, Findings(known=frozenset(found.values)))
    return json.dumps(clean, indent=2) + "\n", urls + found.paths, "rewritten (layout not kept)"


# redis.conf directives holding a secret that secret_name() does not recognise.
_REDIS_SECRET_DIRECTIVES = ("masterauth", "masteruser")
_REDIS_ACL_PASSWORD = re.compile(r"(?<=\s)([>#<!])\S+")


def redact_redis_conf(text: str) -> tuple[str, list[str]]:
    """redis.conf without its secrets: the arguments of `requirepass`, `masterauth`,
    `tls-key-file-pass`… and the passwords and hashes (`>pass`, `#sha256`) of `user`
    ACL lines become <redacted>; comments and every other line kept."""
    out, names = [], []
    for line in text.splitlines(keepends=True):
        parts = line.split(None, 1)
        directive = parts[0].lower() if parts and not parts[0].startswith("#") else ""
        secret = directive in _REDIS_SECRET_DIRECTIVES or (
            secret_name(directive) and not directive.endswith(("-file", "-dir"))
        )
        if secret and len(parts) > 1:
            ending = line[len(line.rstrip("\r\n")) :]
            out.append(f"{parts[0]} {PLACEHOLDER}{ending}")
            names.append(directive)
        elif directive == "user" and _REDIS_ACL_PASSWORD.search(line):
            out.append(_REDIS_ACL_PASSWORD.sub(lambda m: f"{m[1]}{PLACEHOLDER}", line))
            names.append(f"user {line.split()[1] if len(line.split()) > 1 else ''}".strip())
        else:
            out.append(line)
    return "".join(out), names


def redact_file(relative: str, data: bytes) -> tuple[bytes, list[str], str]:
    """The bytes to store for one config file, and what was redacted from it."""
    text = data.decode("utf-8", errors="surrogateescape")
    name = Path(relative).name
    if name.endswith(".conf"):
        clean, found = redact_redis_conf(redact_urls(text)[0])
        how = "in place"
    elif name.endswith((".yml", ".yaml")):
        compose = any(fnmatch(name, pattern) for pattern in COMPOSE_PATTERNS)
        clean, found, how = redact_yaml(text, compose)
    elif name.endswith(".json"):
        clean, found, how = redact_json(text)
    else:
        clean, count = redact_urls(text)
        found, how = ([f"{count} URL credential(s)"] if count else []), "in place"
    return clean.encode("utf-8", errors="surrogateescape"), found, how
