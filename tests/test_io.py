"""Atomic writes: nothing half-written under a final name, and files readable as the umask allows."""
from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from sersynth import io


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        for path in (io.atomic_write_json(tmp_path / "a.json", {"x": 1}),
                     io.atomic_save_npz(tmp_path / "b.npz", {"x": np.zeros(3)})):
            assert stat.S_IMODE(path.stat().st_mode) == mode, path
    finally:
        os.umask(old)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = io.atomic_write_bytes(tmp_path / "r.json", b"old")

    def boom(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        io._atomic(path, boom)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_atomic_copy_streams_the_whole_file(tmp_path):
    src = tmp_path / "src.bin"
    data = np.random.default_rng(0).bytes(3 * 2**20 + 17)          # larger than copyfileobj's buffer
    src.write_bytes(data)
    dst = io.atomic_copy(src, tmp_path / "dst.bin")
    assert dst.read_bytes() == data and sorted(p.name for p in tmp_path.iterdir()) == ["dst.bin", "src.bin"]
