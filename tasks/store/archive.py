"""Compression, checksums and manifests: the format of what we store.

One streaming pass compresses and hashes; nothing holds a whole backup in memory.
gzip (via isal, gzip-compatible so operators can `gunzip` by hand) is the default;
zstd is the option for speed and size.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal, Protocol

import zstandard
from isal import igzip, igzip_threaded

from tasks.common.files import CHUNK, create_file, discard_file

Compression = Literal["gzip", "zstd"]
SUFFIXES: dict[str, str] = {"gzip": ".gz", "zstd": ".zst"}
GZIP_LEVEL = 1  # isal level 1: ~1.5 GB/s, ratio close to gzip -6 on session data
ZSTD_LEVEL = 3
MANIFEST_SUFFIX = ".manifest.json"
AGE_SUFFIX = ".age"  # an age-encrypted file: the backup's name plus this
MANIFEST_FORMAT = 1


class ArchiveError(ValueError):
    """A stored backup does not match what its manifest promises."""


def check_compression(compression: str) -> Compression:
    """Reject an unknown compression name with the accepted ones."""
    if compression not in SUFFIXES:
        raise ValueError(f"unknown compression {compression!r}: use one of {', '.join(SUFFIXES)}")
    return compression  # type: ignore[return-value]


class HashingWriter(io.RawIOBase):
    """A write-only file that hashes and counts what passes into it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.sha256.update(view)
        self.size += view.nbytes
        self._raw.write(view)
        return view.nbytes


class HashingReader(io.RawIOBase):
    """A readable stream over `raw` (anything with `read(n)`) that hashes and counts
    what is read from it."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.sha256.update(data)
        self.size += n
        return n


@dataclass(frozen=True)
class EncryptedFile:
    """An age-encrypted copy as written: where, how big, its SHA-256, to whom."""

    path: Path
    size: int
    sha256: str
    recipients: tuple[str, ...]
    seconds: float = 0.0

    def describe(self) -> dict[str, Any]:
        """The manifest's `encryption` entry: public keys and the object's facts."""
        return age_entry(self.recipients, self.size, self.sha256)


def age_entry(recipients: tuple[str, ...], size: int, sha256: str) -> dict[str, Any]:
    """A manifest's `encryption` entry: the public keys, size and SHA-256 of the
    age-encrypted object."""
    return {"format": "age", "recipients": list(recipients), "size": size, "sha256": sha256}


@dataclass(frozen=True)
class CompressedFile:
    """A compressed file as written: where, how big, its SHA-256; with `encrypted`, it
    was written age-encrypted (the local copy encrypted): `path` is that file's."""

    path: Path
    size: int
    sha256: str
    raw_size: int
    compression: Compression
    encrypted: EncryptedFile | None = None


class EncryptedCopy(Protocol):
    """Where the compressed stream goes instead of a plain file: its age encryption
    (tasks.store.encryption)."""

    def write(self, data: Any) -> int: ...
    def close(self) -> EncryptedFile: ...
    def abort(self) -> None: ...


class SyncingWriter(io.RawIOBase):
    """Writes to `file` and has the kernel write it to disk in the background every
    `every` bytes (fdatasync on a thread, as Redis's rdb-save-incremental-fsync does),
    so the fsync that makes it durable at the end waits for the last few MiB only."""

    def __init__(self, file: IO[bytes], every: int = 32 << 20) -> None:
        self._file = file
        self._every = every
        self._unsynced = 0
        self._pool = ThreadPoolExecutor(1)
        self._pending: Future[None] | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        n = self._file.write(data)
        self._unsynced += n
        if self._unsynced >= self._every and (self._pending is None or self._pending.done()):
            self._file.flush()
            self._pending = self._pool.submit(os.fdatasync, self._file.fileno())
            self._unsynced = 0
        return n

    def sync(self) -> None:
        """Everything written is on disk (a background sync's error is raised here)."""
        self._file.flush()
        if self._pending is not None:
            self._pending.result()
        os.fsync(self._file.fileno())
        self._pool.shutdown()

    def stop(self) -> None:
        """Wait for a background sync (the file is being discarded)."""
        self._pool.shutdown(wait=True)


class CompressedWriter:
    """Compress, hash and write chunks to `path` in one pass; fsync on close. With
    `encrypted`, the compressed stream flows into it instead (no plain file: `path` is
    unused and the result's path is the encrypted file's; the hash stays that of the
    plain compressed stream)."""

    def __init__(
        self,
        path: Path,
        compression: Compression,
        threads: int = 2,
        encrypted: EncryptedCopy | None = None,
    ) -> None:
        self.path = path
        self.compression = check_compression(compression)
        self.raw_size = 0
        self._copy = encrypted
        self._file: IO[bytes] | None = None
        self._syncing: SyncingWriter | None = None
        sink: Any = encrypted
        if encrypted is None:
            self._file = create_file(path)  # owner-only while staged; closed in close/abort
            sink = self._syncing = SyncingWriter(self._file)
        self._hashing = HashingWriter(sink)
        self._stream: IO[bytes]
        if compression == "gzip":
            self._stream = igzip_threaded.open(  # type: ignore[assignment]
                self._hashing, "wb", compresslevel=GZIP_LEVEL, threads=threads
            )
        else:
            compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=threads)
            self._stream = compressor.stream_writer(self._hashing, closefd=False)

    def write(self, chunk: bytes | memoryview) -> None:
        self._stream.write(chunk)
        self.raw_size += len(chunk)

    def close(self) -> CompressedFile:
        """Finish the stream, flush it to disk and describe the result."""
        self._stream.close()
        encrypted = self._copy.close() if self._copy is not None else None
        if self._file is not None and self._syncing is not None:
            self._syncing.sync()
            self._file.close()
        return CompressedFile(
            path=self.path if encrypted is None else encrypted.path,
            size=self._hashing.size,
            sha256=self._hashing.sha256.hexdigest(),
            raw_size=self.raw_size,
            compression=self.compression,
            encrypted=encrypted,
        )

    def abort(self) -> None:
        """Drop the partial output."""
        with contextlib.suppress(Exception):  # the output is discarded anyway
            self._stream.close()
        if self._copy is not None:
            self._copy.abort()
        if self._syncing is not None:
            self._syncing.stop()
        if self._file is not None:
            discard_file(self._file, self.path)


def open_decompressed(path: Path, compression: Compression) -> IO[bytes]:
    """A readable stream of the original bytes of a compressed backup."""
    if check_compression(compression) == "gzip":
        return igzip.open(path, "rb")  # type: ignore[return-value]
    return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)  # noqa: SIM115


def iter_chunks(stream: IO[bytes], size: int = CHUNK) -> Iterator[bytes]:
    """Read a binary stream in large chunks until EOF."""
    while chunk := stream.read(size):
        yield chunk


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter_chunks(stream):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: Path, size: int, sha256: str) -> None:
    """Refuse a stored file whose size or SHA-256 differs from its manifest."""
    if not path.is_file():
        raise ArchiveError(f"backup file {path} is missing; pick another backup")
    actual_size = path.stat().st_size
    if actual_size != size:
        raise ArchiveError(
            f"backup {path.name} is {actual_size} bytes but its manifest says {size}: "
            "the file is truncated or was replaced; pick another backup"
        )
    actual = sha256_file(path)
    if actual != sha256:
        raise ArchiveError(
            f"backup {path.name} fails its checksum (sha256 {actual[:16]}…, manifest "
            f"{sha256[:16]}…): the file is corrupt; pick another backup"
        )


@dataclass
class Manifest:
    """What a backup is, stored beside it and written last."""

    kind: str
    name: str
    created_at: str
    size: int
    sha256: str
    compression: Compression
    raw_size: int
    duration_seconds: float
    source: dict[str, Any] = field(default_factory=dict)
    steps: dict[str, float] = field(default_factory=dict)
    format: int = MANIFEST_FORMAT
    source_id: str = ""  # what was backed up (tasks.store.sources); "" in older manifests
    # The off-site copy when it is age-encrypted: {"format": "age", "recipients": [public
    # keys], "size", "sha256"} of the encrypted object (`size`/`sha256` above are those
    # of the plain compressed stream), recorded once it is uploaded (a plain local copy
    # is encrypted while it uploads); and "local": true when the local copy is that
    # encrypted file (`local_name`, recorded when it is stored); empty when plain.
    encryption: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def describe(
        cls,
        kind: str,
        name: str,
        stored: CompressedFile,
        duration_seconds: float,
        source: dict[str, Any],
        steps: dict[str, float] | None = None,
        *,
        source_id: str = "",
    ) -> Manifest:
        """The manifest of a file just written by `CompressedWriter`, dated now."""
        return cls(
            kind=kind,
            name=name,
            created_at=datetime.now(UTC).isoformat(),
            size=stored.size,
            sha256=stored.sha256,
            compression=stored.compression,
            raw_size=stored.raw_size,
            duration_seconds=duration_seconds,
            source=source,
            steps=steps or {},
            source_id=source_id,
        )

    @property
    def local_name(self) -> str:
        """The file's name in the backup directory: `.age` added when the local copy is
        encrypted too (`encryption["local"]`)."""
        return self.name + AGE_SUFFIX if self.encryption.get("local") else self.name

    @property
    def local_facts(self) -> tuple[int, str]:
        """Size and SHA-256 of the file in the backup directory (the encrypted one's
        when the local copy is encrypted)."""
        if self.encryption.get("local"):
            return self.encryption["size"], self.encryption["sha256"]
        return self.size, self.sha256

    def plain_file(self, found: Path, given: Path | None) -> Path:
        """The plain compressed file to read: `given` (a verified decrypted copy), else
        the stored file `found`, which must not be encrypted."""
        if given is None and self.encryption.get("local"):
            raise ArchiveError(
                f"backup {self.local_name} is age-encrypted: decrypt it first (the recovery "
                "flows do, with PROXILION_DR_AGE_IDENTITY_FILE)"
            )
        return given or found

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        data = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def manifest_name(name: str) -> str:
    """The sidecar name for a backup's manifest."""
    return name + MANIFEST_SUFFIX


class _WriterFile(io.RawIOBase):
    """A file object over a `CompressedWriter`, for `tarfile` in stream mode."""

    def __init__(self, writer: CompressedWriter) -> None:
        self._writer = writer

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._writer.write(view)
        return view.nbytes


def tar_stream(writer: CompressedWriter) -> tarfile.TarFile:
    """A tar archive written straight into a compressed writer (no temp tar file).

    Close the TarFile first (it writes the end blocks), then `writer.close()`."""
    return tarfile.open(fileobj=_WriterFile(writer), mode="w|", format=tarfile.PAX_FORMAT)


def extract_archive(path: Path, compression: Compression, target: Path) -> list[str]:
    """Unpack a compressed tar backup into `target`, streamed, with tarfile's `data`
    filter: nothing may land outside `target` (absolute paths, `..`, links out)."""
    target.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    with (
        open_decompressed(path, compression) as stream,
        tarfile.open(fileobj=stream, mode="r|") as archive,
    ):
        for member in archive:
            archive.extract(member, target, filter="data")
            names.append(member.name)
    return names
