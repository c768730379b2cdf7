"""age encryption of the off-site copies (pyrage, streamed; Debian's `age` reads them).

Recipients are age public keys (`age1…`): not secrets, so they may be settings,
parameters and manifest entries. The identity (the private key) is only ever read
from a file whose path is given; it never appears in a message, a log or a manifest.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import queue
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pyrage
from pyrage import x25519

from tasks.common.clock import elapsed
from tasks.common.files import CHUNK, create_file, discard_file
from tasks.store.archive import (
    AGE_SUFFIX,
    ArchiveError,
    CompressedWriter,
    Compression,
    EncryptedFile,
    HashingReader,
    HashingWriter,
)

SUFFIX = AGE_SUFFIX


class IdentityError(ValueError):
    """The age identity is missing, unreadable or not one the backup was encrypted to."""


class RecipientError(ValueError):
    """An age recipient (public key) is malformed."""


def parse_recipients(value: str | Iterable[str]) -> list[str]:
    """age public keys from a comma- or space-separated text (or a list); refuses a
    malformed key by naming it, and a private key without showing it."""
    items = re.split(r"[\s,]+", value) if isinstance(value, str) else list(value)
    keys = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        if item.upper().startswith("AGE-SECRET-KEY-"):
            raise RecipientError(
                "an age PRIVATE key was given as a recipient: give its public key "
                "(`age-keygen -y key.txt` prints it, `age1…`) and keep the private key "
                "in the identity file only"
            )
        try:
            x25519.Recipient.from_str(item)
        except pyrage.RecipientError:
            raise RecipientError(
                f"{item!r} is not an age public key (`age1…`, as `age-keygen` prints it)"
            ) from None
        keys.append(item)
    return keys


def load_identity(path: Path | str) -> x25519.Identity:
    """The age identity in the file at `path` (`age-keygen` format: comments and one
    `AGE-SECRET-KEY-1…` line). Errors name the file, never its content."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise IdentityError(
            f"age identity file {path} does not exist: set PROXILION_DR_AGE_IDENTITY_FILE "
            "(or age_identity_file) to the file holding the private key"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise IdentityError(
            f"age identity file {path} cannot be read ({type(error).__name__}): check the "
            "path and that this user may read it"
        ) from None
    keys = [line.strip() for line in lines if line.strip().startswith("AGE-SECRET-KEY-")]
    try:
        [key] = keys
        return x25519.Identity.from_str(key)
    except (ValueError, pyrage.IdentityError):
        raise IdentityError(
            f"age identity file {path} does not hold exactly one valid age private key "
            "(`AGE-SECRET-KEY-1…`, as `age-keygen -o key.txt` writes it)"
        ) from None


def check_identity(identity: x25519.Identity, recipients: list[str], path: Path, what: str) -> None:
    """Refuse an identity whose public key is not among the backup's recipients."""
    public = str(identity.to_public())
    if public not in recipients:
        raise IdentityError(
            f"the age identity in {path} (public key {public}) cannot decrypt {what}, "
            f"which was encrypted to {', '.join(recipients)}: use the identity file of one "
            "of those keys"
        )


class _QueueReader(io.RawIOBase):
    """The readable end of an `EncryptingWriter`: the chunks written to it, in order."""

    def __init__(self, chunks: queue.Queue[bytes | None], owner: EncryptingWriter) -> None:
        self._chunks = chunks
        self._owner = owner
        self._current = memoryview(b"")
        self._done = False

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        while not self._current and not self._done:
            if self._owner.aborted:
                raise OSError("the encrypted copy was abandoned")
            chunk = self._chunks.get()
            if chunk is None:
                self._done = True
            else:
                self._current = memoryview(chunk)
        piece = self._current if size < 0 else self._current[:size]
        self._current = self._current[len(piece) :]
        return bytes(piece)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _KeepingWriteErrors(HashingWriter):
    """A `HashingWriter` that keeps the OS error of a failed write: pyrage passes it on
    only as the text of an EncryptError, and a full disk must stay an OSError (it is
    explained as such, with the fix)."""

    write_error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return super().write(data)
        except OSError as error:
            self.write_error = error
            raise


class _KeepingReadErrors(HashingReader):
    """A `HashingReader` that keeps the OS error of a failed read (pyrage passes it on
    only as the text of an EncryptError; an I/O error must stay one)."""

    read_error: OSError | None = None

    def readinto(self, buffer: Any) -> int:
        try:
            return super().readinto(buffer)
        except OSError as error:
            self.read_error = error
            raise


class EncryptingWriter:
    """A writable stream age-encrypted into `dest` (owner-only, hashed) as it is written:
    pyrage's streaming `encrypt_io` runs on a thread reading from a bounded queue, so
    the data flows through once and memory stays bounded; `dest` is fsynced on close."""

    QUEUED_CHUNKS = 8

    def __init__(self, dest: Path, recipients: Iterable[str]) -> None:
        self.recipients = tuple(recipients)
        keys = [x25519.Recipient.from_str(r) for r in self.recipients]
        self.dest = dest
        self.aborted = False
        self._error: BaseException | None = None
        self._chunks: queue.Queue[bytes | None] = queue.Queue(self.QUEUED_CHUNKS)
        self._file = create_file(dest)
        self._hashing = _KeepingWriteErrors(self._file)
        self._started = time.perf_counter()
        self._thread = threading.Thread(target=self._encrypt, args=(keys,), daemon=True)
        self._thread.start()

    def _encrypt(self, keys: list[x25519.Recipient]) -> None:
        try:
            pyrage.encrypt_io(_QueueReader(self._chunks, self), self._hashing, keys)
        except BaseException as error:  # noqa: BLE001 - handed to the writing thread
            self._error = self._hashing.write_error or error

    def _put(self, chunk: bytes | None) -> None:
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._chunks.put(chunk, timeout=0.5)
                return
            except queue.Full:
                continue

    def write(self, data: bytes) -> int:
        self._put(data)
        return len(data)

    def close(self) -> EncryptedFile:
        """Finish the age stream, fsync it; describe the result."""
        self._put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return EncryptedFile(
            self.dest,
            self._hashing.size,
            self._hashing.sha256.hexdigest(),
            self.recipients,
            elapsed(self._started),
        )

    def abort(self) -> None:
        """Stop encrypting and remove the partial output."""
        self.aborted = True
        with contextlib.suppress(queue.Full):
            self._chunks.put_nowait(None)
        self._thread.join(timeout=30)
        discard_file(self._file, self.dest)


def encrypted_staging(staging: Path) -> Path:
    """Where the encrypted copy of the backup staged at `staging` is written: the same
    hidden staging name with `.age` before the run's token (`.x.gz.age.<token>.partial`)."""
    stem, token, partial = staging.name.rsplit(".", 2)
    return staging.with_name(f"{stem}{SUFFIX}.{token}.{partial}")


@dataclass(frozen=True)
class AgeCopy:
    """The local copy is age-encrypted as it is written (no plain file on disk), to
    these recipients. (A plain local copy is encrypted for S3 while it uploads:
    `EncryptedStream`.)"""

    recipients: tuple[str, ...]


def staged_writer(
    staging: Path, compression: Compression, encrypt: AgeCopy | None = None, threads: int = 2
) -> CompressedWriter:
    """The writer a capture stages its backup with: compressed (on `threads` threads; 0:
    in the writing thread) and hashed, and with `encrypt` age-encrypted in the same pass
    into a durable `.age` file instead (beside it, `encrypted_staging`)."""
    if encrypt is None or not encrypt.recipients:
        return CompressedWriter(staging, compression, threads)
    copy = EncryptingWriter(encrypted_staging(staging), encrypt.recipients)
    return CompressedWriter(staging, compression, threads, encrypted=copy)


class EncryptedStream(io.RawIOBase):
    """The age encryption of `source`, produced as it is read: pyrage's streaming
    `encrypt_io` runs on a thread writing into a pipe. `plain` hashes what it read of
    `source`; an encryption that fails raises here instead of ending the stream short
    (an upload reading it is then abandoned, not completed). Close it to stop early."""

    PIPE_SIZE = 1 << 20  # F_SETPIPE_SZ: fewer wake-ups than the default 64 KiB

    def __init__(self, source: IO[bytes], recipients: Iterable[str]) -> None:
        keys = [x25519.Recipient.from_str(r) for r in recipients]
        self.plain = _KeepingReadErrors(source)
        read_end, write_end = os.pipe()
        with contextlib.suppress(OSError):  # a smaller pipe only costs wake-ups
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, self.PIPE_SIZE)
        self._pipe = os.fdopen(read_end, "rb", buffering=0)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._encrypt, args=(write_end, keys), daemon=True)
        self._thread.start()

    def _encrypt(self, write_end: int, keys: list[x25519.Recipient]) -> None:
        try:
            with os.fdopen(write_end, "wb", buffering=CHUNK) as out:
                pyrage.encrypt_io(self.plain, out, keys)
        except BaseException as error:  # noqa: BLE001 - handed to the reading thread
            self._error = self.plain.read_error or error

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._pipe.readinto(buffer) or 0
        if n == 0:  # the writing end closed: done, or failed
            self._thread.join()
            if self._error is not None:
                raise self._error
        return n

    def close(self) -> None:
        if not self.closed:
            self._pipe.close()  # a writer blocked on the full pipe gets EPIPE and ends
            self._thread.join()
        super().close()


def decrypt_stream(source: IO[bytes], out: IO[bytes], identity: x25519.Identity, what: str) -> None:
    """Decrypt an age stream into `out`; a damaged stream is an ArchiveError."""
    try:
        pyrage.decrypt_io(source, out, [identity])
    except pyrage.DecryptError as error:
        raise ArchiveError(
            f"{what} does not decrypt ({error}): the object is damaged or not ours; pick "
            "another backup (nothing was changed)"
        ) from None
