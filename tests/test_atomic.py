"""contracts/atomic.py: crash-safe writes, and file I/O in bounded kernel calls (a sidecar's one large write()
delayed the server's threads by a scheduler tick)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import contracts.atomic as atomic
from contracts.atomic import (WRITE_CHUNK_BYTES, read_file, save_atomic, save_file, write_atomic, write_chunked,
                              write_file)


class _Recorder(io.RawIOBase):
    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sizes.append(len(b))
        self.data += b
        return len(b)


def test_write_chunked_never_hands_the_kernel_more_than_a_chunk():
    data = np.random.default_rng(0).integers(0, 255, 2 * WRITE_CHUNK_BYTES + 123, dtype=np.uint8)
    rec = _Recorder()
    write_chunked(rec, data)  # an array, not only bytes
    assert rec.sizes == [WRITE_CHUNK_BYTES, WRITE_CHUNK_BYTES, 123]
    assert bytes(rec.data) == data.tobytes()
    rec = _Recorder()
    write_chunked(rec, b"")
    assert rec.sizes == []


class _ShortWrites(_Recorder):
    """write(2) as on a nearly full disk: at most `per_call` bytes a call, nothing once `room` is used up; what it
    takes also goes to `file` when given (a real temp file)."""

    def __init__(self, per_call: int, room: int, file=None) -> None:
        super().__init__()
        self.per_call, self.room, self.file = per_call, room, file

    def write(self, b) -> int:
        n = min(len(b), self.per_call, self.room - len(self.data))
        if n <= 0:
            return 0
        if self.file is not None:
            self.file.write(memoryview(b)[:n])
        return super().write(memoryview(b)[:n])

    def fileno(self) -> int:
        return self.file.fileno()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        super().close()


def test_write_chunked_continues_short_writes():
    data = np.random.default_rng(1).integers(0, 255, WRITE_CHUNK_BYTES + 5000, dtype=np.uint8).tobytes()
    rec = _ShortWrites(per_call=4096, room=10**9)
    write_chunked(rec, data)
    assert bytes(rec.data) == data
    assert max(rec.sizes) == 4096


def test_a_full_disk_raises_and_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "rollout.json"
    write_atomic(target, b"old")
    with pytest.raises(OSError, match="stopped after 16384 of 20000 bytes"):
        write_chunked(_ShortWrites(per_call=16384, room=16384), b"x" * 20000)

    real_fdopen = atomic.os.fdopen  # the real temp file, taking only its first 16 KiB
    monkeypatch.setattr(atomic.os, "fdopen",
                        lambda fd, *a, **k: _ShortWrites(per_call=16384, room=16384, file=real_fdopen(fd, *a, **k)))
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, b"y" * 20000)
    assert target.read_bytes() == b"old"  # not a torn 16 KiB file
    assert [p.name for p in tmp_path.iterdir()] == ["rollout.json"]  # the temp file removed


@pytest.mark.parametrize("size", [0, 5, WRITE_CHUNK_BYTES, 3 * WRITE_CHUNK_BYTES + 7])
def test_files_written_and_read_in_chunks_round_trip(tmp_path, size):
    data = np.random.default_rng(size).integers(0, 255, size, dtype=np.uint8).tobytes()
    write_atomic(tmp_path / "a", data)
    write_file(tmp_path / "b", data)
    assert read_file(tmp_path / "a") == data == read_file(tmp_path / "b")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_savers_stream_through_the_chunked_writer(tmp_path, monkeypatch):
    sizes = []
    real = atomic.write_chunked
    monkeypatch.setattr(atomic, "write_chunked", lambda f, data: sizes.append(memoryview(data).nbytes) or real(f, data))
    arr = np.arange(600_000, dtype=np.float32).reshape(2000, 300)  # 2.4 MB
    save_file(tmp_path / "x.npy", lambda f: np.save(f, arr))
    save_file(tmp_path / "z.npz", lambda f: np.savez(f, a=arr, b=arr[:3]))
    save_atomic(tmp_path / "t.pt", lambda f: torch.save({"w": torch.from_numpy(arr)}, f))
    write_atomic(tmp_path / "y", b"abc")
    assert sizes and sizes[-1] == 3
    assert np.array_equal(np.load(tmp_path / "x.npy"), arr)
    with np.load(tmp_path / "z.npz") as z:
        assert np.array_equal(z["a"], arr) and np.array_equal(z["b"], arr[:3])
    assert torch.equal(torch.load(tmp_path / "t.pt")["w"], torch.from_numpy(arr))
    assert torch.equal(torch.load(io.BytesIO(read_file(tmp_path / "t.pt")))["w"], torch.from_numpy(arr))
