"""Atomic file writes: a crash never leaves a half-written artifact under its final name."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np


_WRITER = True   # False on every process but 0 of a multi-host run (sersynth.dist): it writes nothing


def set_writer(flag: bool) -> None:
    global _WRITER
    _WRITER = bool(flag)


def is_writer() -> bool:
    return _WRITER


def _atomic(path: str | os.PathLike, write) -> Path:
    path = Path(path)
    if not _WRITER:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())       # mkstemp's 0600 would hide reports from colleagues
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return _atomic(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """``src`` copied to ``dst`` atomically, streamed (not read into memory whole)."""
    with open(src, "rb") as f_in:
        return _atomic(dst, lambda f: shutil.copyfileobj(f_in, f))


def without_added_later(d: dict, added_later: Mapping[str, Any]) -> dict:
    """``d`` without the settings added after runs were recorded, where they hold the value that
    reproduces the older behaviour: a run recorded before a setting existed stays the same run."""
    return {k: v for k, v in d.items() if not (k in added_later and v == added_later[k])}


def atomic_save_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> Path:
    return _atomic(path, lambda f: np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()}))


class CorruptFile(ValueError):
    """An artifact exists but cannot be read back (truncated, bad checksum, not its format)."""


def load_npz(path: str | os.PathLike, advice: str = "delete it to rebuild it") -> dict[str, np.ndarray]:
    """Every array of an ``.npz``, read (and CRC-checked) now; :class:`CorruptFile` names the file
    and ``advice`` when it cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise CorruptFile(f"{path} is unreadable or corrupt ({type(e).__name__}: {e}); {advice}") from None


def read_json(path: str | os.PathLike, advice: str = "delete it to rebuild it") -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise CorruptFile(f"{path} is not valid JSON ({type(e).__name__}: {e}); {advice}") from None


_LOCKS: dict[str, Any] = {}
LOCK_FILE = ".lock"                      # the file in a folder that holds its lock and the owner's pid


def _take_lock(path: str | os.PathLike, wait: str | None):
    """The open ``.lock`` of the folder ``path``, exclusively locked and holding this process's pid.
    When another process holds it: with ``wait`` (the work to name in the log line) this waits for it;
    without, raises :class:`DirectoryLocked`."""
    import fcntl
    import logging

    Path(path).mkdir(parents=True, exist_ok=True)
    f = open(Path(path) / LOCK_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        owner = f.read().strip() or "?"
        if wait is None:
            f.close()
            raise DirectoryLocked(f"{path} is in use by another sersynth process (pid {owner}); wait for it to "
                                  "finish or use another --workdir") from None
        logging.info("%s: waiting for sersynth process %s, which holds %s", wait, owner, path)
        fcntl.flock(f, fcntl.LOCK_EX)
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def lock_dir(path: str | os.PathLike) -> None:
    """Takes an exclusive lock on the folder ``path`` for the life of this process (``.lock`` in it,
    holding the owner's pid). The kernel releases it when the process dies, however it dies, so a
    lock left by a killed run never blocks the next one. Raises :class:`DirectoryLocked` when another
    live process holds it."""
    key = str(Path(path).resolve())
    if key in _LOCKS or not _WRITER:
        return
    _LOCKS[key] = _take_lock(path, wait=None)


class DirectoryLocked(RuntimeError):
    """Another live process holds the folder's lock."""


@contextlib.contextmanager
def hold_dir(path: str | os.PathLike, what: str):
    """Holds an exclusive lock on the folder ``path`` (its ``.lock``) while this process writes outputs
    that other runs may share (a ``--cache_dir`` or ``--experts_dir``), waiting while another process
    holds it: two runs started together on one shared folder then compute its content once, the second
    reusing what the first wrote, instead of both computing it. ``what`` names the work in the log
    line said while waiting. A folder this process already holds (:func:`lock_dir`) is entered at once."""
    if str(Path(path).resolve()) in _LOCKS or not _WRITER:
        yield
        return
    with _take_lock(path, wait=what):        # closing the file releases the lock
        yield


def as_json(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists, numpy scalars numbers), so a live
    configuration compares equal to the one a file recorded."""
    return json.loads(json.dumps(obj, default=_json_default))


def fingerprint(obj: Any) -> str:
    """Short stable hash of a JSON-able object (configs, manifests)."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
