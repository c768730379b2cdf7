"""The keyed sample a Redis backup records: real servers, a real SAVE and a real reload."""

from __future__ import annotations

from pathlib import Path

from tasks.redis_sample import check_sample, confirm_sample, open_clients, pick_sample
from tests.redis_servers import running_redis, seed_mixed_data, start_from_rdb


def test_a_sample_taken_around_a_save_matches_the_reloaded_snapshot(tmp_path: Path) -> None:
    with running_redis(tmp_path / "live") as live:
        seed_mixed_data(live, n_keys=600)
        clients = open_clients(live.url, [0, 3])
        before = pick_sample(clients, size=40)
        assert {entry["db"] for entry in before} == {0, 3}
        assert {entry["type"] for entry in before} >= {"string", "hash", "list", "set", "zset"}
        assert all("sha256" in e and "value" not in e for e in before)
        changed = before[0]
        clients[changed["db"]].delete(changed["key"])
        live.client().save()
        sample = confirm_sample(clients, before)
        assert changed not in sample and len(sample) == len(before) - 1

        with start_from_rdb(tmp_path / "live" / "dump.rdb", tmp_path / "restored") as restored:
            restored_clients = open_clients(restored.url, [0, 3])
            assert check_sample(restored_clients, sample) == []

            victim = sample[0]
            key = victim["key"].encode()
            restored_clients[victim["db"]].delete(key)
            other = sample[1]
            db = restored_clients[other["db"]]
            if other["type"] == "string":
                db.set(other["key"], b"tampered", keepttl=True)
            else:
                db.rename(other["key"], b"moved-away")
            problems = check_sample(restored_clients, sample)
    assert len(problems) == 2, problems
    assert "is missing" in problems[0]


def test_a_sampled_key_whose_ttl_passed_may_be_missing(tmp_path: Path) -> None:
    with running_redis(tmp_path / "live") as live:
        client = live.client()
        client.set("session:short", "x", px=120_000)
        clients = open_clients(live.url, [0])
        sample = pick_sample(clients, size=1)
        assert sample and sample[0]["expires_at_ms"] is not None
        client.delete("session:short")
        expiry = sample[0]["expires_at_ms"]
        assert check_sample(clients, sample, now_ms=expiry - 1) != []
        assert check_sample(clients, sample, now_ms=expiry + 1) == []
