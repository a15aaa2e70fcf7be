"""Files you can trust: atomic writes, content-hashed checkpoint files, and removal of interrupted writes.

- **Atomic**: every file is written to a temporary file beside the target, flushed, fsynced and renamed over it,
  so a reader never sees a partial file. The file gets the permissions ``open()`` would give it (``0o666`` less the
  process umask, e.g. ``rw-r--r--``), not ``mkstemp``'s private ``0o600``: results are shared like any other file.
- **Interrupted writes are cleaned up**: a process killed mid-write leaves its ``.<name>.<host>.<pid>.<rand>.tmp``
  behind; the next write of the same target removes the leftovers of writers that are gone (a process of this host
  that no longer runs, or any leftover older than `STALE_TMP_S`), never those of a write still in progress.
- **Content-hashed checkpoints**: `atomic_torch_save` writes a fixed-size header — magic, format version, payload
  length and the SHA-256 of the payload — followed by the ``torch.save`` payload. `safe_torch_load` checks the
  header, the length and the hash *before* unpickling anything, then unpickles with ``weights_only=True``. Any
  flipped byte (header or payload), a truncated or an extended file is refused with a message naming the file.
  Files without the header (plain ``torch.save`` files) are refused too: nothing released depends on them, and a
  file that cannot be verified should not silently become a resumed run's weights.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import socket
import struct
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

MAGIC = b"CTTA-CKPT\x00"          # 10 bytes: what the file is
FORMAT_VERSION = 1
_HEADER = struct.Struct(">10sHQ32s")  # magic, version, payload length, sha256(payload)
HEADER_SIZE = _HEADER.size
STALE_TMP_S = 3600.0  # a leftover whose writer cannot be checked (another host, old name) is stale after this


class CorruptFileError(RuntimeError):
    """A checkpoint file failed its integrity check (or is not a ctta checkpoint file)."""


# ------------------------------------------------------------------------------------------- atomic writes
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True  # cannot tell: keep the file
    return True


def remove_stale_tmp(path: str | Path) -> list[Path]:
    """Remove the temporary files that interrupted writes of ``path`` left beside it; returns what was removed.

    A leftover ``.<name>.<host>.<pid>.<rand>.tmp`` is removed when its writer was a process of this host that no
    longer runs; any other ``.<name>.*.tmp`` (another host, or a name from an older version) once it is older
    than `STALE_TMP_S`. A write in progress (live process, fresh file) is never touched."""
    path = Path(path)
    prefix, host, now, removed = f".{path.name}.", _host(), time.time(), []
    try:
        entries = list(os.scandir(path.parent))
    except FileNotFoundError:
        return removed
    for e in entries:
        if not (e.name.startswith(prefix) and e.name.endswith(".tmp")) or not e.is_file(follow_symlinks=False):
            continue
        parts = e.name[len(prefix):-len(".tmp")].rsplit(".", 2)
        ours = len(parts) == 3 and parts[0] == host and parts[1].isdigit()
        try:
            stale = (not _pid_alive(int(parts[1]))) if ours else (now - e.stat().st_mtime > STALE_TMP_S)
            if stale:
                os.unlink(e.path)
                removed.append(Path(e.path))
        except FileNotFoundError:  # another writer cleaned it first
            continue
    return removed


def _umask() -> int:
    """The process umask. Read from /proc on Linux: setting it to read it back (``os.umask``) would change it for
    every thread for a moment, and a file another thread creates then would get the wrong mode."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> Path:
    """Write through a temporary file in the same directory, then rename: readers never see a partial file.
    Leftovers of earlier interrupted writes of the same target are removed first (`remove_stale_tmp`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_host()}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes 0o600; the renamed file should look like any file the user makes
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


# ------------------------------------------------------------------------------------------- hashed checkpoints
class _HashingWriter:
    """A write-only file wrapper that hashes and counts what passes through (torch.save only calls write)."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        n = self.f.write(data)
        self.n += n
        return n

    def flush(self) -> None:
        self.f.flush()


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
    """``torch.save(obj)`` behind a content-hash header (see the module docstring), written atomically. The
    payload is hashed as it streams to disk; the header, written last, is in place before the rename."""
    def write(f: BinaryIO) -> None:
        f.write(b"\0" * HEADER_SIZE)
        w = _HashingWriter(f)
        torch.save(obj, w)
        f.seek(0)
        f.write(_HEADER.pack(MAGIC, FORMAT_VERSION, w.n, w.sha.digest()))
        f.seek(0, os.SEEK_END)
    return atomic_write(path, write)


def read_verified(path: str | Path) -> bytes:
    """The payload of a file written by `atomic_torch_save`, after checking its header, length and hash."""
    path = Path(path)
    if path.is_dir():
        raise CorruptFileError(f"{path} is a folder, not a checkpoint file; move it away")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(HEADER_SIZE)
        payload = f.read()
    if len(head) < HEADER_SIZE or not head.startswith(MAGIC):
        raise CorruptFileError(
            f"{path} is not a ctta checkpoint file (no content-hash header): it was written by another program or "
            "an older ctta, or its first bytes are damaged. It cannot be verified, so it is not loaded; re-create it "
            "with this version (e.g. re-run into a fresh output folder)")
    _, version, length, digest = _HEADER.unpack(head)
    if version != FORMAT_VERSION:
        raise CorruptFileError(f"{path} is corrupt or from a newer ctta: checkpoint format version {version}, "
                               f"this version reads {FORMAT_VERSION}")
    if len(payload) != length:
        raise CorruptFileError(f"{path} is corrupt: truncated or extended ({len(payload)} payload bytes, the header "
                               f"says {length}); re-create it")
    if hashlib.sha256(payload).digest() != digest:
        raise CorruptFileError(f"{path} is corrupt: content hash mismatch (sha256 of the payload differs from the "
                               "one written with it); re-create it or restore it from a good copy")
    return payload


def safe_torch_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a file written by `atomic_torch_save`: integrity checked first, then unpickled with
    ``weights_only=True`` (tensors and plain containers only, no arbitrary objects)."""
    payload = read_verified(path)
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # torch's text would suggest weights_only=False: never
        raise CorruptFileError(f"cannot load checkpoint {path}: it holds objects that only an unrestricted unpickler "
                               f"would build ({refused_global(e)}), which ctta never runs; it was not written by "
                               "ctta") from None
    except Exception as e:  # verified bytes that torch cannot read: say which file
        raise CorruptFileError(f"cannot load checkpoint {path}: {' '.join(str(e).split())[:300]}") from e


def probe_writable(folder: str | Path) -> None:
    """Create ``folder`` (and its parents) and prove that a file can be written there now, before any work whose
    result would go there; raises OSError otherwise. The probe file is removed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=folder)
    os.close(fd)
    os.unlink(probe)


class FolderLock:
    """One process at a time writes a run folder: an exclusive, non-blocking ``flock`` on ``<folder>/.lock``, held
    until `release` (or the process ends: the kernel drops it, so a killed run leaves no stale lock). The file keeps
    the holder's host and pid for the message. Where ``fcntl`` is missing (Windows), nothing is locked."""

    NAME = ".lock"

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / self.NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise `FolderBusy` naming the process that holds it."""
        try:
            import fcntl
        except ImportError:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise FolderBusy(f"{self.path.parent} is in use by another run right now ({holder}): wait for it to "
                             f"end, or give this run another name= / out_dir=") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


class FolderBusy(RuntimeError):
    """Another process holds a run folder's `FolderLock`."""


def refused_global(e: Exception) -> str:
    """What a ``weights_only`` load refused, from torch's message (its line "... GLOBAL posix.system ..."), without
    the rest of that message, which suggests loading the file unrestricted."""
    names = [ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln]
    return names[0] if names else "objects other than tensors and plain values"


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
