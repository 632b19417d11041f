"""The snapshot file: what a reader checks, each refusal one line naming the file.

A file is written with `SnapshotWriter` (RAM area sparse, then the state document and the
preamble); reading checks the magic, the format version (a newer one refused before anything
else), the preamble's checksum, the length and the state's checksum.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmlet.errors import KvmletError
from kvmlet.snapshot import codec
from kvmlet.snapshot.format import (
    FORMAT_VERSION,
    MAGIC,
    PREAMBLE,
    PREAMBLE_SIZE,
    SnapshotError,
    SnapshotFile,
    SnapshotWriter,
)

STATE = {"format": FORMAT_VERSION, "devices": {"com1": {"fifo": b"\x00\xffab", "ier": 3}}}


def write_snapshot(path, state=STATE, banks=(8192,)) -> int:
    writer = SnapshotWriter(str(path), list(banks))
    for offset in writer.bank_offsets:
        os.pwrite(writer.fd, b"guest", offset)
    size = writer.finish(state)
    writer.commit()
    return size


def test_a_written_snapshot_reads_back_with_its_state_and_ram(tmp_path):
    path = tmp_path / "a.snap"
    size = write_snapshot(path, banks=(8192, 4096))
    assert path.stat().st_size == size
    with SnapshotFile(str(path)) as snapshot:
        assert snapshot.state == STATE
        assert snapshot.ram_offset == PREAMBLE_SIZE
        assert snapshot.ram_size == 8192 + 4096
        assert os.pread(snapshot.fd, 5, PREAMBLE_SIZE) == b"guest"
        assert os.pread(snapshot.fd, 5, PREAMBLE_SIZE + 8192) == b"guest"
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".partial")]


def test_the_ram_area_stays_sparse(tmp_path):
    path = tmp_path / "sparse.snap"
    write_snapshot(path, banks=(64 << 20,))
    assert path.stat().st_size > 64 << 20
    assert path.stat().st_blocks * 512 < 1 << 20


def test_an_aborted_snapshot_leaves_nothing_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.snap"
    write_snapshot(path)
    before = path.read_bytes()
    writer = SnapshotWriter(str(path), [4096])
    writer.abort()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["a.snap"]


FIELDS = ("magic", "version", "flags", "ram_offset", "ram_size", "state_offset", "state_size")
FIELDS += ("state_crc",)


def rewrite_preamble(path, **changes) -> None:
    """Change preamble fields and seal them with a valid checksum again."""
    with open(path, "r+b") as file:
        values = dict(zip(FIELDS, PREAMBLE.unpack(file.read(PREAMBLE.size)), strict=True))
        values.update(changes)
        packed = PREAMBLE.pack(*values.values())
        file.seek(0)
        file.write(packed + struct.pack("<I", zlib.crc32(packed)))


def refusal(path) -> str:
    with pytest.raises(SnapshotError) as caught:
        SnapshotFile(str(path))
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    return message


def test_a_file_that_is_no_snapshot_is_refused(tmp_path):
    path = tmp_path / "kernel"
    path.write_bytes(b"\x7fELF" + bytes(100))
    assert "not a kvmlet snapshot" in refusal(path)
    path.write_bytes(b"")
    assert "not a kvmlet snapshot" in refusal(path)


def test_a_newer_format_is_refused_before_anything_else_is_read(tmp_path):
    path = tmp_path / "new.snap"
    path.write_bytes(MAGIC + struct.pack("<I", FORMAT_VERSION + 1) + b"a future layout")
    message = refusal(path)
    assert f"format {FORMAT_VERSION + 1}" in message and "newer kvmlet" in message


def test_an_older_format_is_refused(tmp_path):
    path = tmp_path / "old.snap"
    write_snapshot(path)
    rewrite_preamble(path, version=0)
    assert "too old" in refusal(path)


def test_a_damaged_header_is_refused(tmp_path):
    path = tmp_path / "a.snap"
    write_snapshot(path)
    with open(path, "r+b") as file:
        file.seek(20)
        file.write(b"\x01")
    assert "damaged header" in refusal(path)


@pytest.mark.parametrize("keep", [12, PREAMBLE_SIZE, PREAMBLE_SIZE + 4096, -1])
def test_a_truncated_file_is_refused(tmp_path, keep):
    path = tmp_path / "a.snap"
    size = write_snapshot(path)
    os.truncate(path, keep if keep >= 0 else size + keep)
    assert "truncated" in refusal(path)


def test_extra_bytes_are_refused(tmp_path):
    path = tmp_path / "a.snap"
    write_snapshot(path)
    with open(path, "ab") as file:
        file.write(b"x")
    assert "1 bytes too many" in refusal(path)


def test_a_damaged_state_is_refused(tmp_path):
    path = tmp_path / "a.snap"
    size = write_snapshot(path)
    with open(path, "r+b") as file:
        file.seek(size - 3)
        file.write(b"#")
    assert "damaged state (checksum mismatch)" in refusal(path)


def test_a_state_without_its_format_version_is_refused(tmp_path):
    path = tmp_path / "a.snap"
    write_snapshot(path, state={"devices": {}})
    assert "no format version" in refusal(path)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text() | st.binary(),
        lambda children: st.lists(children) | st.dictionaries(st.text(), children),
        max_leaves=20,
    )
)
def test_the_codec_carries_every_plain_value(value):
    assert codec.decode(codec.encode(value)) == value


def test_the_codec_refuses_what_is_not_a_plain_value():
    with pytest.raises(TypeError):
        codec.encode({"lock": object()})
    with pytest.raises(KvmletError):
        codec.decode(b'{"$bytes": "not base64!"}')
    with pytest.raises(KvmletError):
        codec.decode(b"\x00 not json")


def test_kvmlet_run_refuses_a_broken_snapshot_in_one_line(tmp_path):
    path = tmp_path / "a.snap"
    size = write_snapshot(path)
    os.truncate(path, size - 1)
    result = subprocess.run(
        [sys.executable, "-m", "kvmlet", "run", "--restore", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    expected = f"kvmlet: {path}: truncated: {size - 1} of its {size} bytes are there"
    assert result.stderr.splitlines() == [expected]
