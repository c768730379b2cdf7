"""Moving data out of a restore's way never overwrites and never deletes, and a failed
restore is undone."""

from __future__ import annotations

from pathlib import Path

from tasks.common.aside import move_into_aside, put_back

STAMP = "20260101_000000"  # the same second for every call below


def test_same_stamp_never_overwrites_files_folders_or_links(tmp_path: Path) -> None:
    names = ["dump.rdb", "appendonlydir", "link"]
    moved = []
    for n in range(3):
        (tmp_path / "dump.rdb").write_bytes(f"copy {n}".encode())
        (tmp_path / "appendonlydir").mkdir()
        (tmp_path / "appendonlydir" / "base").write_bytes(f"aof {n}".encode())
        (tmp_path / "link").symlink_to(tmp_path / "appendonlydir")
        moved.append(move_into_aside(tmp_path, names, tmp_path / "dump.rdb", STAMP))
    assert [m.folder.name for m in moved] == [
        f"dump.rdb.before-restore-{STAMP}",
        f"dump.rdb.before-restore-{STAMP}-2",
        f"dump.rdb.before-restore-{STAMP}-3",
    ]
    assert [(m.folder / "dump.rdb").read_bytes() for m in moved] == [
        b"copy 0",
        b"copy 1",
        b"copy 2",
    ]
    assert [(m.folder / "appendonlydir" / "base").read_bytes() for m in moved] == [
        b"aof 0",
        b"aof 1",
        b"aof 2",
    ]
    assert all((m.folder / "link").is_symlink() for m in moved)
    assert all(m.names == sorted(names) for m in moved)


def test_an_existing_name_of_another_type_is_skipped_not_replaced(tmp_path: Path) -> None:
    (tmp_path / f"data.before-restore-{STAMP}").write_bytes(b"someone's file")
    (tmp_path / "data").write_bytes(b"old")
    moved = move_into_aside(tmp_path, ["data", "missing"], tmp_path / "data", STAMP)
    assert moved.folder == tmp_path / f"data.before-restore-{STAMP}-2"
    assert moved.names == ["data"]  # absent names are skipped
    assert (tmp_path / f"data.before-restore-{STAMP}").read_bytes() == b"someone's file"


def test_contents_move_into_a_new_folder_and_the_folder_stays(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "wal").mkdir(parents=True)
    (data / "wal" / "0001").write_bytes(b"wal")
    first = move_into_aside(data, None, data, STAMP)
    (data / "new").write_bytes(b"new")
    second = move_into_aside(data, None, data, STAMP)
    assert first.folder != second.folder
    assert (first.folder / "wal" / "0001").read_bytes() == b"wal"
    assert (second.folder / "new").exists()
    assert data.is_dir() and list(data.iterdir()) == []


def test_put_back_restores_the_old_data_and_keeps_what_the_failed_restore_left(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "dump.rdb").write_bytes(b"old")
    moved = move_into_aside(data, ["dump.rdb"], data / "dump.rdb", STAMP)
    (data / "dump.rdb").write_bytes(b"half-restored")
    kept = put_back(moved, data / "failed-restore", ["dump.rdb"])
    assert (data / "dump.rdb").read_bytes() == b"old"
    assert kept is not None and (kept / "dump.rdb").read_bytes() == b"half-restored"
    assert not moved.folder.exists()
