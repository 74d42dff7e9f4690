"""The pcap writer: classic libpcap format, LINKTYPE_ETHERNET, byte for byte."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from nitro_netd.parent.pcap import (
    PcapWriter,
    build_global_header,
    build_record_header,
)


def test_global_header_is_libpcap_2_4_ethernet() -> None:
    header = build_global_header(65535)
    assert len(header) == 24
    assert struct.unpack("=IHHiIII", header) == (0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)


def test_record_header_splits_seconds_and_microseconds() -> None:
    assert struct.unpack("=IIII", build_record_header(1700000000.25, 60, 60)) == (
        1700000000, 250000, 60, 60,
    )  # fmt: skip


def test_writer_appends_records_and_truncates_to_snaplen(tmp_path: Path) -> None:
    path = tmp_path / "x.pcap"
    writer = PcapWriter(path, snaplen=16, clock=lambda: 10.5)
    writer.write(b"\x01" * 14)
    writer.write(memoryview(b"\x02" * 20))
    writer.close()
    writer.close()

    data = path.read_bytes()
    assert data[:24] == build_global_header(16)
    assert data[24:40] == build_record_header(10.5, 14, 14)
    assert data[40:54] == b"\x01" * 14
    assert data[54:70] == build_record_header(10.5, 16, 20)
    assert data[70:] == b"\x02" * 16
    assert writer.frames == 2


def test_writer_after_close_ignores_frames(tmp_path: Path) -> None:
    writer = PcapWriter(tmp_path / "x.pcap")
    writer.close()
    writer.write(b"late")
    assert (tmp_path / "x.pcap").stat().st_size == 24


def test_writer_stops_whole_before_the_size_limit_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "x.pcap"
    limit = 24 + 3 * (16 + 60)  # room for exactly three 60-byte frames
    writer = PcapWriter(path, max_bytes=limit, clock=lambda: 1.0)
    for n in range(5):
        writer.write(bytes([n]) * 60)
    writer.close()
    data = path.read_bytes()
    assert len(data) == limit
    assert writer.frames == 3
    assert data[-60:] == bytes([2]) * 60
    assert "capture stopped after 3 frames" in caplog.text


def test_writer_without_a_limit_keeps_everything(tmp_path: Path) -> None:
    writer = PcapWriter(tmp_path / "x.pcap", max_bytes=None)
    for _ in range(100):
        writer.write(bytes(1000))
    writer.close()
    assert (tmp_path / "x.pcap").stat().st_size == 24 + 100 * (16 + 1000)
