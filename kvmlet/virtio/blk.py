"""virtio-blk (virtio 1.2 §5.2) over a raw image file.

Requests are a 16-byte header (type, reserved, sector) in readable buffers, data, and a status
byte in the last writable byte. Data moves between guest RAM and the image with `os.preadv` /
`os.pwritev` straight on guest-memory views, so a write is in the file (with `direct`, past
the page cache) before the request completes; T_FLUSH is `fdatasync`. Discard and write-zeroes use
`fallocate` and are offered only when a probe shows the image's file system supports them.

Requests are served on up to `concurrency` threads at once (a slow disk, or a flush, does not
hold up the requests behind it), and each completes on its own, in whatever order the host
finishes them. Every request taken from the ring is completed: one that cannot be served, for
whatever reason, with VIRTIO_BLK_S_IOERR.

The image is locked with `flock` (exclusive when writable, shared when read-only), so two
monitors cannot open the same writable image. A disk is described by `DiskConfig`
(`virtio/blk_config.py`).
"""

from __future__ import annotations

import os
import struct

from kvmlet.memory import GuestMemory
from kvmlet.virtio.blk_config import DiskConfig
from kvmlet.virtio.blk_io import (
    DIRECT_ALIGNMENT,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    ImageIo,
    probe_fallocate,
)
from kvmlet.virtio.device import VirtioDevice
from kvmlet.virtio.queue import DescriptorChain, slice_views
from kvmlet.virtio.serving import Request

VIRTIO_ID_BLOCK = 2

VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

SECTOR_SIZE = 512
ID_BYTES = 20
QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2
SIZE_MAX = 1 << 20
MAX_TRANSFER = SEG_MAX * SIZE_MAX
MAX_RANGE_SECTORS = 0x3F_FFFF
MAX_RANGE_SEGMENTS = 32

_HEADER = struct.Struct("<IIQ")
_RANGE = struct.Struct("<QII")
# capacity, size_max, seg_max, geometry, blk_size, topology, writeback + unused + num_queues,
# max_discard_sectors, max_discard_seg, discard_sector_alignment, max_write_zeroes_sectors,
# max_write_zeroes_seg, write_zeroes_may_unmap + 3 unused bytes.
_CONFIG = struct.Struct("<QII4sI8s4sIIIIIB3x")


class _RequestFailed(Exception):
    """A request the device completes with a non-OK status."""

    def __init__(self, status: int):
        self.status = status


class VirtioBlock(VirtioDevice):
    """A virtio block device backed by a raw image file."""

    device_id = VIRTIO_ID_BLOCK
    name = "virtio-blk"
    concurrency = 4

    def __init__(self, memory: GuestMemory, options: DiskConfig, serial: str | None = None):
        self.options = options
        self.image = ImageIo.open(os.fspath(options.path), options.read_only, options.direct)
        try:
            self.capacity_sectors = self.image.size // SECTOR_SIZE
            self.serial = (serial or self._default_serial()).encode()[:ID_BYTES]
            punch, zero = (
                (False, False) if options.read_only else probe_fallocate(os.fspath(options.path))
            )
            self.can_discard, self.can_write_zeroes = punch, zero
            super().__init__(memory, [QUEUE_SIZE], self._features(), self._config_bytes())
        except BaseException:
            self.image.close()
            raise

    def _default_serial(self) -> str:
        status = os.fstat(self.image.fd)
        return f"kvmlet-{status.st_dev:x}-{status.st_ino:x}"

    def _features(self) -> int:
        features = (
            1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
        )
        if self.options.read_only:
            features |= 1 << VIRTIO_BLK_F_RO
        if self.can_discard:
            features |= 1 << VIRTIO_BLK_F_DISCARD
        if self.can_write_zeroes:
            features |= 1 << VIRTIO_BLK_F_WRITE_ZEROES
        return features

    def _config_bytes(self) -> bytes:
        block_size = DIRECT_ALIGNMENT if self.options.direct else SECTOR_SIZE
        return _CONFIG.pack(
            self.capacity_sectors,
            SIZE_MAX,
            SEG_MAX,
            bytes(4),
            block_size,
            bytes(8),
            bytes(4),
            MAX_RANGE_SECTORS,
            MAX_RANGE_SEGMENTS,
            DIRECT_ALIGNMENT // SECTOR_SIZE,
            MAX_RANGE_SECTORS,
            MAX_RANGE_SEGMENTS,
            int(self.can_discard),
        )

    def close(self) -> None:
        """Stop using the rings; close the image once no request is in flight (a transfer
        that outlives shutdown then never writes into a file that got its descriptor number)."""
        super().close()
        self.when_idle(0, self.image.close)

    def may_block(self, chain: DescriptorChain) -> bool:
        """Direct I/O waits on the disk, a flush on fdatasync: the chains behind may overlap
        them. Buffered reads and writes go to the page cache, faster than a thread handoff."""
        first = chain.first_view
        return self.options.direct or (len(first) >= 4 and first[0] == VIRTIO_BLK_T_FLUSH)

    def request_failed(self, request: Request, error: Exception) -> int:
        """Whatever went wrong, the request completes with VIRTIO_BLK_S_IOERR."""
        chain = request.chain
        if chain.writable_length == 0:
            return 0
        self._write_status(chain, VIRTIO_BLK_S_IOERR)
        return 1

    @staticmethod
    def _write_status(chain: DescriptorChain, status: int) -> None:
        last = chain.last_view
        if last:
            last[-1] = status
        else:
            chain.write(bytes([status]), chain.writable_length - 1)

    def handle_request(self, request: Request) -> int:
        """Serve one request; returns the bytes written into the chain (data + status)."""
        chain = request.chain
        if chain.writable_length == 0:
            return 0
        try:
            if chain.readable_length < _HEADER.size:
                raise _RequestFailed(VIRTIO_BLK_S_IOERR)
            first = chain.first_view
            header = first if len(first) >= _HEADER.size else chain.read(0, _HEADER.size)
            request_type, _, sector = _HEADER.unpack_from(header)
            written = self._serve(chain, request_type, sector)
            status = VIRTIO_BLK_S_OK
        except _RequestFailed as failure:
            written, status = 0, failure.status
        except OSError:
            written, status = 0, VIRTIO_BLK_S_IOERR
        last = chain.last_view
        if last:
            last[-1] = status
        else:
            chain.write(bytes([status]), chain.writable_length - 1)
        return written + 1

    def _serve(self, chain: DescriptorChain, request_type: int, sector: int) -> int:
        status_offset = chain.writable_length - 1
        if request_type == VIRTIO_BLK_T_IN:
            offset = self._byte_range(sector, status_offset)
            if chain.iovec is None:
                views = _data_views(chain.writable_views, 0, status_offset, chain.writable_length)
                self.image.read_into(views, offset, status_offset)
            else:
                self._move_whole_table_data(chain, True, offset, status_offset)
            return status_offset
        if request_type == VIRTIO_BLK_T_OUT:
            self._refuse_if_read_only()
            length = chain.readable_length - _HEADER.size
            offset = self._byte_range(sector, length)
            if chain.iovec is None:
                total = chain.readable_length
                views = _data_views(chain.readable_views, _HEADER.size, total, total)
                self.image.write_from(views, offset, length)
            else:
                self._move_whole_table_data(chain, False, offset, length)
            return 0
        if request_type == VIRTIO_BLK_T_FLUSH:
            self.image.flush()
            return 0
        if request_type == VIRTIO_BLK_T_GET_ID:
            return chain.write(self.serial.ljust(ID_BYTES, b"\0")[:status_offset])
        if request_type == VIRTIO_BLK_T_DISCARD and self.can_discard:
            self._serve_ranges(chain, allowed_flags=0, unmap_mode=FALLOC_FL_PUNCH_HOLE)
            return 0
        if request_type == VIRTIO_BLK_T_WRITE_ZEROES and self.can_write_zeroes:
            self._serve_ranges(
                chain, allowed_flags=VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, unmap_mode=None
            )
            return 0
        raise _RequestFailed(VIRTIO_BLK_S_UNSUPP)

    def _move_whole_table_data(
        self, chain: DescriptorChain, reading: bool, offset: int, length: int
    ) -> None:
        """Move the data of a chain read as a whole table, which comes as host iovecs: when the
        header and the status byte have buffers of their own (Linux's layout), in one call to
        the kernel; whatever that did not move (all of it for another layout), through views."""
        image, iovec, moved = self.image, chain.iovec, 0
        if reading and chain.lengths[-1] == 1:
            moved = image.read_iovec(
                iovec.part(chain.readable_count, len(chain.lengths) - 1), offset, length
            )
        elif not reading and chain.lengths[0] == _HEADER.size:
            moved = image.write_iovec(iovec.part(1, chain.readable_count), offset, length)
        if moved == length:
            return
        if reading:
            views = _data_views(chain.writable_views, 0, length, chain.writable_length)
        else:
            total = chain.readable_length
            views = _data_views(chain.readable_views, _HEADER.size, total, total)
        views = slice_views(views, moved, length) if moved else views
        move = image.read_into if reading else image.write_from
        move(views, offset + moved, length - moved)

    def _refuse_if_read_only(self) -> None:
        if self.options.read_only:
            raise _RequestFailed(VIRTIO_BLK_S_IOERR)

    def _byte_range(self, sector: int, length: int) -> int:
        """The image offset of a data transfer; IOERR when misaligned, oversized (more than the
        seg_max * size_max the device advertised) or past the capacity."""
        if length % SECTOR_SIZE or length > MAX_TRANSFER:
            raise _RequestFailed(VIRTIO_BLK_S_IOERR)
        if sector + length // SECTOR_SIZE > self.capacity_sectors:
            raise _RequestFailed(VIRTIO_BLK_S_IOERR)
        return sector * SECTOR_SIZE

    def _serve_ranges(self, chain: DescriptorChain, allowed_flags: int, unmap_mode: int | None):
        """Discard (punch holes) or write zeroes over each 16-byte range segment."""
        self._refuse_if_read_only()
        length = chain.readable_length - _HEADER.size
        if not 0 < length <= MAX_RANGE_SEGMENTS * _RANGE.size or length % _RANGE.size:
            raise _RequestFailed(VIRTIO_BLK_S_IOERR)
        ranges = list(_RANGE.iter_unpack(chain.read(_HEADER.size)))
        for sector, count, flags in ranges:
            if flags & ~allowed_flags:
                raise _RequestFailed(VIRTIO_BLK_S_UNSUPP)
            if count > MAX_RANGE_SECTORS or sector + count > self.capacity_sectors:
                raise _RequestFailed(VIRTIO_BLK_S_IOERR)
        for sector, count, flags in ranges:
            if unmap_mode is not None:
                mode = unmap_mode
            elif flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP and self.can_discard:
                mode = FALLOC_FL_PUNCH_HOLE
            else:
                mode = FALLOC_FL_ZERO_RANGE
            self.image.fallocate(mode, sector * SECTOR_SIZE, count * SECTOR_SIZE)


def _data_views(views: list[memoryview], start: int, stop: int, total: int) -> list[memoryview]:
    """The data part of a request's buffers, without slicing in the usual layout.

    Linux puts the header, each data segment and the status byte in buffers of their own: then
    the data is whole views. Any other layout is sliced.
    """
    if start == len(views[0]) and stop == total:
        return views[1:]
    if start == 0 and len(views[-1]) == 1 and stop == total - 1:
        return views[:-1]
    return slice_views(views, start, stop)
