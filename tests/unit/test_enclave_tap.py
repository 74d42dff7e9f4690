"""TAP creation: the ifreq layout and one-line errors (no real device needed)."""

from __future__ import annotations

import errno
import struct
from pathlib import Path

import pytest

from nitro_netd.enclave.tap import IFF_NO_PI, IFF_TAP, TapError, build_ifreq, open_tap


def test_tap_ifreq_layout() -> None:
    ifreq = build_ifreq("tap0")
    assert len(ifreq) == 40
    name, flags = struct.unpack_from("16sH", ifreq)
    assert name.rstrip(b"\0") == b"tap0"
    assert flags == IFF_TAP | IFF_NO_PI


@pytest.mark.parametrize("name", ["", "a" * 16, "tâp", "a/b"])
def test_tap_ifreq_rejects_bad_names(name: str) -> None:
    with pytest.raises(TapError, match="interface name"):
        build_ifreq(name)


def test_tap_missing_tun_device_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(TapError, match="modprobe tun") as info:
        open_tap("tap0", tun_path=str(tmp_path / "no-such-tun"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("code", "advice"),
    [(errno.EPERM, "run as root"), (errno.EACCES, "run as root"), (errno.EBUSY, "busy")],
)
def test_tap_errors_become_one_line_advice(
    monkeypatch: pytest.MonkeyPatch, code: int, advice: str
) -> None:
    def refuse(path: str, flags: int) -> int:
        raise OSError(code, "refused")

    monkeypatch.setattr("nitro_netd.enclave.tap.os.open", refuse)
    with pytest.raises(TapError, match=advice):
        open_tap("tap0")
