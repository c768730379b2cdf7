"""Moving data out of a restore's way never overwrites and never deletes."""

from __future__ import annotations

from pathlib import Path

from tasks.common.aside import move_aside, move_contents_aside

STAMP = "20260101_000000"  # the same second for every call below


def test_same_stamp_never_overwrites_files_folders_or_links(tmp_path: Path) -> None:
    moved = []
    for n in range(3):
        (tmp_path / "dump.rdb").write_bytes(f"copy {n}".encode())
        moved.append(move_aside(tmp_path / "dump.rdb", STAMP))
        (tmp_path / "appendonlydir").mkdir()
        (tmp_path / "appendonlydir" / "base").write_bytes(f"aof {n}".encode())
        moved.append(move_aside(tmp_path / "appendonlydir", STAMP))
    assert [p.name for p in moved if p] == [
        f"dump.rdb.before-restore-{STAMP}",
        f"appendonlydir.before-restore-{STAMP}",
        f"dump.rdb.before-restore-{STAMP}-2",
        f"appendonlydir.before-restore-{STAMP}-2",
        f"dump.rdb.before-restore-{STAMP}-3",
        f"appendonlydir.before-restore-{STAMP}-3",
    ]
    assert [p.read_bytes() for p in moved[0::2] if p] == [b"copy 0", b"copy 1", b"copy 2"]
    assert [(p / "base").read_bytes() for p in moved[1::2] if p] == [b"aof 0", b"aof 1", b"aof 2"]
    (tmp_path / "link").symlink_to(moved[1])
    link = move_aside(tmp_path / "link", STAMP)
    assert link is not None and link.is_symlink() and (moved[1] / "base").exists()


def test_an_existing_name_of_another_type_is_skipped_not_replaced(tmp_path: Path) -> None:
    (tmp_path / f"data.before-restore-{STAMP}").mkdir()  # empty: rename(2) would replace it
    (tmp_path / "data").write_bytes(b"old")
    assert move_aside(tmp_path / "data", STAMP) == tmp_path / f"data.before-restore-{STAMP}-2"
    assert move_aside(tmp_path / "missing", STAMP) is None


def test_contents_move_into_a_new_folder_and_the_folder_stays(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "wal").mkdir(parents=True)
    (data / "wal" / "0001").write_bytes(b"wal")
    first = move_contents_aside(data, STAMP)
    (data / "new").write_bytes(b"new")
    second = move_contents_aside(data, STAMP)
    assert first is not None and second is not None and first != second
    assert (first / "wal" / "0001").read_bytes() == b"wal" and (second / "new").exists()
    assert data.is_dir() and list(data.iterdir()) == []
    assert move_contents_aside(data, STAMP) is None
