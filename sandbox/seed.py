"""Realistic session data for the sandbox Redis (shaped like the gateway's own keys).

db 0:
    session:<uuid>          JSON string: tool-call history, risk score; most with a TTL
                            of 1-24 h, about a fifth without one
    ratelimit:<uuid>:<min>  counters, TTL 5-60 min
    stats:daily             hash of per-day counters
    killchain:scores        sorted set session id -> risk score
    alerts:recent           list of JSON alerts, newest first
db 1:
    config:gateway (hash), blocklist:tools (set), cache:threatintel:<n> (strings with TTL),
    migrations:applied (list)
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis

TOOLS: tuple[tuple[str, int], ...] = (
    ("read_file", 10),
    ("list_directory", 5),
    ("search", 5),
    ("http_request", 20),
    ("write_file", 25),
    ("query_database", 20),
    ("send_email", 30),
    ("execute_command", 45),
    ("shell_exec", 50),
)
PATHS = ("/srv/app/README.md", "/etc/passwd", "/home/dev/.ssh/id_rsa", "/var/log/app.log", "/tmp/x")
USERS = ("alice", "bob", "carol", "dave", "erin", "ci-bot", "agent-7")
STAGES = ("recon", "collection", "credential_access", "exfiltration", "none")


@dataclass(frozen=True)
class SeedSummary:
    sessions: int
    sessions_with_ttl: int
    ratelimit_keys: int
    alerts: int
    db1_keys: int

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _tool_call(rng: random.Random, moment: datetime) -> dict[str, Any]:
    tool, base = rng.choice(TOOLS)
    if tool in {"read_file", "write_file", "list_directory"}:
        args: dict[str, Any] = {"path": rng.choice(PATHS)}
    elif tool in {"execute_command", "shell_exec"}:
        args = {"command": rng.choice(("ls -la", "cat /etc/passwd", "curl http://203.0.113.9/x"))}
    elif tool == "http_request":
        args = {"method": rng.choice(("GET", "POST")), "url": "https://api.example.com/v1/items"}
    elif tool == "send_email":
        args = {"to": "someone@example.com", "subject": "report"}
    else:
        args = {"query": rng.choice(("users", "orders last week", "select * from tokens"))}
    score = min(100, base + rng.randint(0, 40))
    return {"ts": _iso(moment), "tool": tool, "args": args, "score": score}


def url_for_db(redis_url: str, db: int) -> str:
    """``redis_url`` pointing at database ``db`` (from_url lets the URL's db win over db=)."""
    parts = urlsplit(redis_url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


def seed(
    redis_url: str,
    sessions: int = 2000,
    *,
    rng_seed: int | None = None,
    batch: int = 500,
) -> SeedSummary:
    """Write ``sessions`` sessions and their companion keys into the Redis at ``redis_url``.

    ``redis_url`` names db 0 (its db number is ignored: db 0 and db 1 are both written).
    Each call adds new sessions (random ids; pass ``rng_seed`` for a repeatable data set).
    """
    rng = random.Random(rng_seed)
    now = datetime.now(UTC)
    minute_now = int(now.timestamp() // 60)
    db0 = redis.Redis.from_url(url_for_db(redis_url, 0), socket_timeout=30)
    db1 = redis.Redis.from_url(url_for_db(redis_url, 1), socket_timeout=30)
    with_ttl = ratelimits = alerts = 0
    scores: dict[str, int] = {}
    daily: dict[str, int] = {}
    try:
        pipe = db0.pipeline(transaction=False)
        for index in range(sessions):
            session_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            created = now - timedelta(minutes=rng.randint(1, 23 * 60))
            history = []
            moment = created
            for _ in range(rng.randint(1, 12)):
                moment += timedelta(seconds=rng.randint(1, 300))
                history.append(_tool_call(rng, moment))
            risk = max(call["score"] for call in history)
            doc = {
                "session_id": session_id,
                "user": rng.choice(USERS),
                "client": rng.choice(("claude-desktop", "cursor", "custom-agent")),
                "created_at": _iso(created),
                "updated_at": history[-1]["ts"],
                "calls": len(history),
                "risk_score": risk,
                "killchain_stage": rng.choice(STAGES),
                "history": history,
            }
            key = f"session:{session_id}"
            value = json.dumps(doc, separators=(",", ":"))
            if rng.random() < 0.8:
                pipe.set(key, value, ex=rng.randint(1, 24) * 3600 - rng.randint(0, 1800))
                with_ttl += 1
            else:
                pipe.set(key, value)
            scores[session_id] = risk
            if rng.random() < 0.3:
                minute = minute_now - rng.randint(0, 30)
                rate_key = f"ratelimit:{session_id}:{minute}"
                pipe.set(rate_key, rng.randint(1, 120), ex=rng.randint(5, 60) * 60)
                ratelimits += 1
            for call in history:
                day = call["ts"][:10]
                daily[f"{day}:calls"] = daily.get(f"{day}:calls", 0) + 1
                if call["score"] >= 50:
                    alert = {
                        "ts": call["ts"],
                        "session_id": session_id,
                        "tool": call["tool"],
                        "score": call["score"],
                    }
                    if alerts < 500:
                        pipe.rpush("alerts:recent", json.dumps(alert, separators=(",", ":")))
                    alerts += 1
                    daily[f"{day}:alerts"] = daily.get(f"{day}:alerts", 0) + 1
            if (index + 1) % batch == 0:
                pipe.execute()
        pipe.zadd("killchain:scores", scores)
        if daily:
            pipe.hset("stats:daily", mapping=daily)
        pipe.hset("stats:daily", mapping={"seeded_at": _iso(now), "sessions": sessions})
        pipe.ltrim("alerts:recent", 0, 499)
        pipe.execute()

        pipe1 = db1.pipeline(transaction=False)
        pipe1.hset(
            "config:gateway",
            mapping={"mode": "monitor", "alert_threshold": 50, "block_threshold": 70},
        )
        pipe1.sadd("blocklist:tools", "shell_exec", "raw_socket", "kernel_module_load")
        pipe1.delete("migrations:applied")
        pipe1.rpush("migrations:applied", "0001_init", "0002_sessions_ttl", "0003_killchain")
        threat_keys = 20
        for n in range(threat_keys):
            pipe1.set(f"cache:threatintel:{n}", json.dumps({"ioc": f"203.0.113.{n}"}), ex=7200)
        pipe1.execute()
        db1_keys = 3 + threat_keys
    finally:
        db0.close()
        db1.close()
    return SeedSummary(
        sessions=sessions,
        sessions_with_ttl=with_ttl,
        ratelimit_keys=ratelimits,
        alerts=min(alerts, 500),
        db1_keys=db1_keys,
    )
