"""The newc cpio writer: parsed back by a reader of our own and by Debian's `cpio -t`."""

from __future__ import annotations

import io
import shutil
import stat
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmlet.guest.cpio import HEADER_SIZE, NEWC_MAGIC, TRAILER_NAME, CpioWriter

FIELDS = [
    "ino",
    "mode",
    "uid",
    "gid",
    "nlink",
    "mtime",
    "filesize",
    "devmajor",
    "devminor",
    "rdevmajor",
    "rdevminor",
    "namesize",
    "check",
]


def read_newc(archive: bytes) -> list[dict]:
    """Every entry of a newc archive (trailer included), checking magic and 4-byte alignment."""
    entries = []
    offset = 0
    while True:
        assert offset % 4 == 0
        header = archive[offset : offset + HEADER_SIZE]
        assert header[:6] == NEWC_MAGIC
        entry = {name: int(header[6 + 8 * i : 14 + 8 * i], 16) for i, name in enumerate(FIELDS)}
        name_start = offset + HEADER_SIZE
        raw_name = archive[name_start : name_start + entry["namesize"]]
        assert raw_name.endswith(b"\0")
        entry["name"] = raw_name[:-1].decode()
        data_start = name_start + entry["namesize"] + (-(HEADER_SIZE + entry["namesize"]) % 4)
        assert archive[name_start + entry["namesize"] : data_start] == b"\0" * (
            data_start - name_start - entry["namesize"]
        )
        entry["data"] = archive[data_start : data_start + entry["filesize"]]
        offset = data_start + entry["filesize"] + (-entry["filesize"] % 4)
        entries.append(entry)
        if entry["name"] == TRAILER_NAME:
            assert offset == len(archive)
            return entries


def sample_archive() -> bytes:
    stream = io.BytesIO()
    writer = CpioWriter(stream)
    writer.add_directory("dev")
    writer.add_char_device("/dev/console", 5, 1)
    writer.add_file("init", b"#!/bin/sh\necho hi\n", 0o755)
    writer.add_symlink("bin/sh", "/bin/busybox")
    writer.finish()
    return stream.getvalue()


def test_entries_read_back_with_names_modes_and_data():
    entries = {entry["name"]: entry for entry in read_newc(sample_archive())}
    assert list(entries) == ["dev", "dev/console", "init", "bin/sh", TRAILER_NAME]
    assert entries["dev"]["mode"] == stat.S_IFDIR | 0o755
    assert entries["init"]["mode"] == stat.S_IFREG | 0o755
    assert entries["init"]["data"] == b"#!/bin/sh\necho hi\n"
    assert entries["bin/sh"]["mode"] == stat.S_IFLNK | 0o777
    assert entries["bin/sh"]["data"] == b"/bin/busybox"
    assert all(entry["uid"] == entry["gid"] == entry["mtime"] == 0 for entry in entries.values())


def test_console_is_char_device_5_1():
    console = next(e for e in read_newc(sample_archive()) if e["name"] == "dev/console")
    assert stat.S_ISCHR(console["mode"])
    assert (console["rdevmajor"], console["rdevminor"]) == (5, 1)
    assert console["filesize"] == 0


def test_inodes_are_distinct():
    inodes = [e["ino"] for e in read_newc(sample_archive()) if e["name"] != TRAILER_NAME]
    assert len(set(inodes)) == len(inodes)


@pytest.mark.skipif(shutil.which("cpio") is None, reason="Debian's cpio is not installed")
def test_debian_cpio_lists_the_archive():
    listing = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=sample_archive(), capture_output=True, check=True
    ).stdout.decode()
    lines = listing.splitlines()
    assert [line.split()[-1] for line in lines[:3]] == ["dev", "dev/console", "init"]
    assert lines[1].startswith("crw-------") and "5,   1" in lines[1]
    assert lines[3].endswith("bin/sh -> /bin/busybox")


def test_duplicate_and_bad_names_and_late_entries_are_refused():
    writer = CpioWriter(io.BytesIO())
    writer.add_file("a", b"")
    with pytest.raises(ValueError):
        writer.add_file("/a/", b"x")
    with pytest.raises(ValueError):
        writer.add_file("", b"x")
    with pytest.raises(ValueError):
        writer.add_file(TRAILER_NAME, b"x")
    writer.finish()
    with pytest.raises(ValueError):
        writer.add_file("b", b"")


@given(
    st.dictionaries(
        st.text(
            st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/"),
            min_size=1,
            max_size=40,
        ).filter(lambda name: name != TRAILER_NAME),
        st.binary(max_size=70),
        max_size=8,
    )
)
def test_any_files_round_trip(files):
    stream = io.BytesIO()
    writer = CpioWriter(stream)
    for name, data in files.items():
        writer.add_file(name, data)
    writer.finish()
    entries = read_newc(stream.getvalue())
    assert {e["name"]: e["data"] for e in entries[:-1]} == files
