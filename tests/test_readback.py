"""The read-back: every byte of the written copy is read again and must hash as the source did."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from dtsbridge.engine import CopyOptions, copyfile
from dtsbridge.errors import CHECKSUM_MISMATCH, TransferError
from tests.dts_fixtures import MiB, Transfer
from tests.test_manifests import Env


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def corrupt_writes(monkeypatch: pytest.MonkeyPatch, change: Callable[[bytes], bytes]) -> None:
    """The copy's writes put ``change(chunk)`` on disk for the first chunk of ``a.fna`` (the source
    bytes, hashed as read, stay right): what a bad disk, controller or filesystem would do."""
    real = copyfile._write_all  # noqa: SLF001

    def bad(fd: int, data: memoryview) -> None:
        if os.lseek(fd, 0, os.SEEK_CUR) == 0 and os.readlink(f"/proc/self/fd/{fd}").endswith("/a.fna"):
            real(fd, memoryview(change(bytes(data))))
        else:
            real(fd, data)

    monkeypatch.setattr(copyfile, "_write_all", bad)


@pytest.mark.parametrize("change", [
    lambda b: b[:1000] + bytes([b[1000] ^ 1]) + b[1001:],   # one bit flipped
    lambda b: b + b"x",                                      # one byte more
    lambda b: b[:-1],                                        # one byte less
])
@pytest.mark.parametrize("size", [5000, 3 * MiB])
def test_a_copy_that_differs_from_what_was_read_fails_and_leaves_nothing(
        env: Env, monkeypatch: pytest.MonkeyPatch, change: Callable[[bytes], bytes], size: int) -> None:
    t = Transfer(env.dts, "alice")
    t.jdp("img/a.fna", os.urandom(size))
    t.finish()
    corrupt_writes(monkeypatch, change)
    with pytest.raises(TransferError) as e:
        env.copy(t, options=CopyOptions(workers=1))
    assert e.value.reason == CHECKSUM_MISMATCH and "a.fna" in e.value.message, e.value
    assert os.listdir(env.users / "alice") == []
