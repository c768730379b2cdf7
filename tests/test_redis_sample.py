"""The keyed sample a Redis backup records: real servers, a real SAVE and a real reload."""

from __future__ import annotations

from pathlib import Path

import pytest
from redis_servers import running_redis, seed_mixed_data, start_from_rdb

from flows.backup_redis import backup_redis
from tasks.redis.sample import check_sample, confirm_sample, open_clients, pick_sample
from tasks.store.archive import open_decompressed


def test_a_sample_taken_around_a_save_matches_the_reloaded_snapshot(tmp_path: Path) -> None:
    with running_redis(tmp_path / "live") as live:
        seed_mixed_data(live, n_keys=600)
        clients = open_clients(live.url, [0, 3])
        before = pick_sample(clients, size=120)  # 60 in db0: every type, all but surely
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


@pytest.mark.parametrize("fetch", ["network", "path"])
def test_backup_redis_records_a_sample_that_its_restore_matches(fetch: str, tmp_path: Path) -> None:
    """The sample goes into the manifest on every fetch route (the network route's
    snapshot is made by the replication stream: sampled before it, confirmed after)."""
    with running_redis(tmp_path / "live") as live:
        seed_mixed_data(live, n_keys=400)
        manifest = backup_redis(
            redis_url=live.url,
            container="",
            fetch=fetch,
            data_dir=str(live.dir) if fetch == "path" else "",
            backup_dir=str(tmp_path / "backups"),
            s3_bucket="",
        )
    sample = manifest["source"]["sample"]
    assert len(sample) >= 16 and all("value" not in entry for entry in sample)
    rdb = tmp_path / "restored.rdb"
    with open_decompressed(tmp_path / "backups" / manifest["name"], "gzip") as stream:
        rdb.write_bytes(stream.read())
    with start_from_rdb(rdb, tmp_path / "restored") as restored:
        clients = open_clients(restored.url, sorted({e["db"] for e in sample}))
        assert check_sample(clients, sample) == []
