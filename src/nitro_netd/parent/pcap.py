"""``--pcap FILE``: every link frame, both directions, in classic pcap for Wireshark.

Format (https://wiki.wireshark.org/Development/LibpcapFileFormat): a 24-byte global header
(magic 0xa1b2c3d4 in native byte order, version 2.4, snaplen, LINKTYPE_ETHERNET), then per
frame a 16-byte record header (seconds, microseconds, captured length, original length)
and the frame's first `snaplen` bytes. Writes go through a large userspace buffer and are
flushed when the daemon stops; a write error disables the capture (logged once) rather
than stopping the daemon. So does reaching `max_bytes` (``--pcap-max-mb``, 1 GiB by
default): the file is closed whole, with every frame before the limit, and the log says so.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Final

logger = logging.getLogger(__name__)

PCAP_MAGIC: Final = 0xA1B2C3D4
LINKTYPE_ETHERNET: Final = 1
DEFAULT_SNAPLEN: Final = 65535
BUFFER_BYTES: Final = 1 << 20
DEFAULT_MAX_BYTES: Final = 1 << 30
_GLOBAL: Final = struct.Struct("=IHHiIII")
_RECORD: Final = struct.Struct("=IIII")


def build_global_header(snaplen: int = DEFAULT_SNAPLEN) -> bytes:
    """The 24-byte file header."""
    return _GLOBAL.pack(PCAP_MAGIC, 2, 4, 0, 0, snaplen, LINKTYPE_ETHERNET)


def build_record_header(timestamp: float, captured: int, original: int) -> bytes:
    """The 16-byte header before each frame."""
    seconds = int(timestamp)
    micros = min(int((timestamp - seconds) * 1_000_000), 999_999)
    return _RECORD.pack(seconds, micros, captured, original)


class PcapWriter:
    """Appends frames to a pcap file; `write` is the bridge's frame tap."""

    def __init__(
        self,
        path: Path,
        *,
        snaplen: int = DEFAULT_SNAPLEN,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Create (truncate) `path` and write the file header; None for `max_bytes`: no
        limit on the file's size.

        Raises:
            OSError: the file cannot be created.
        """
        self.path = path
        self.snaplen = snaplen
        self.frames = 0
        self.max_bytes = max_bytes
        self.size = _GLOBAL.size
        self._clock = clock
        self._file: BinaryIO | None = open(path, "wb", buffering=BUFFER_BYTES)  # noqa: SIM115
        self._file.write(build_global_header(snaplen))

    def write(self, frame: bytes | bytearray | memoryview) -> None:
        """Record one frame, timestamped now (copies it: views may be reused)."""
        if self._file is None:
            return
        captured = min(len(frame), self.snaplen)
        record = _RECORD.size + captured
        if self.max_bytes is not None and self.size + record > self.max_bytes:
            logger.warning(
                "pcap %s: %d bytes reached (--pcap-max-mb); capture stopped after %d frames",
                self.path,
                self.size,
                self.frames,
            )
            self.close()
            return
        try:
            self._file.write(build_record_header(self._clock(), captured, len(frame)))
            self._file.write(frame[:captured])
        except OSError as exc:
            logger.error("pcap %s: %s; capture stopped", self.path, exc)
            self._close_quietly()
            return
        self.frames += 1
        self.size += record

    def close(self) -> None:
        """Flush and close (idempotent)."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                logger.error("pcap %s: %s while flushing", self.path, exc)
            self._file = None
            logger.info("pcap %s: %d frames", self.path, self.frames)

    def _close_quietly(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()
