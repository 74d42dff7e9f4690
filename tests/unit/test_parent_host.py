"""Host-side helpers: the throttled warning for failures that recur once per flow."""

from __future__ import annotations

import errno
import logging

import pytest

from nitro_netd.parent.host import ThrottledWarning, descriptor_hint


def test_a_recurring_warning_is_logged_once_per_interval_with_the_count_it_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    warning = ThrottledWarning(logging.getLogger("test.throttle"), 10.0, lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.throttle"):
        for flow in range(1000):  # a SYN storm while out of descriptors
            warning.warn("flow %d: cannot open a socket", flow)
        now[0] += 10.0
        warning.warn("flow %d: cannot open a socket", 1000)
        now[0] += 10.0
        warning.warn("flow %d: cannot open a socket", 1001)
    assert caplog.messages == [
        "flow 0: cannot open a socket",
        "flow 1000: cannot open a socket (999 more like it not logged)",
        "flow 1001: cannot open a socket",
    ]


def test_only_running_out_of_descriptors_gets_the_open_files_hint() -> None:
    assert "ulimit -n" in descriptor_hint(OSError(errno.EMFILE, "Too many open files"))
    assert "ulimit -n" in descriptor_hint(OSError(errno.ENFILE, "Too many open files in system"))
    assert descriptor_hint(OSError(errno.ENOBUFS, "No buffer space available")) == ""
