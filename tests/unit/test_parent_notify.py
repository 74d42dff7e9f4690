"""The systemd notify protocol: socket addresses and messages."""

from __future__ import annotations

from nitro_netd.parent.notify import build_message, notify_address, sd_notify


def test_abstract_socket_name_starts_with_nul() -> None:
    assert notify_address("@/org/freedesktop/systemd1/notify/123") == (
        b"\0/org/freedesktop/systemd1/notify/123"
    )


def test_path_socket_is_used_as_is_and_relative_is_refused() -> None:
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("relative/sock") is None


def test_message_is_newline_separated_key_values() -> None:
    assert build_message(READY=1, STATUS="listening on vsock://:1024", MAINPID=42) == (
        b"READY=1\nSTATUS=listening on vsock://:1024\nMAINPID=42"
    )
    assert build_message(STOPPING=1) == b"STOPPING=1"


def test_without_notify_socket_nothing_is_sent() -> None:
    assert sd_notify(b"READY=1", {}) is False
    assert sd_notify(b"READY=1", {"NOTIFY_SOCKET": ""}) is False
    assert sd_notify(b"READY=1", {"NOTIFY_SOCKET": "bad"}) is False
