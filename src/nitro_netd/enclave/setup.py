"""Bring the enclave's network up once, before the agent's first link session."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from nitro_netd.enclave.netconfig import PROC_SYS, InterfacePlan, configure_interface, disable_ipv6
from nitro_netd.enclave.resolv import write_resolv_conf
from nitro_netd.enclave.tap import open_tap

logger = logging.getLogger("nitro_netd.enclave")


def bring_up_network(
    plan: InterfacePlan,
    resolv_conf: str | None,
    *,
    tap_opener: Callable[[str], int] = open_tap,
    proc_sys: str = PROC_SYS,
) -> int:
    """Create and configure the TAP, write resolv.conf, and return the TAP's descriptor.

    The caller keeps the descriptor open for the agent's life: closing it removes the TAP.
    IPv6 is turned off on it before it comes up (`disable_ipv6`; `proc_sys` is where
    ``/proc/sys`` is, for tests).

    Raises:
        TapError, NetConfigError, ResolvConfError: with a message saying what to do.
    """
    fd = tap_opener(plan.name)
    try:
        disable_ipv6(plan.name, proc_sys)
        configure_interface(plan)
        if resolv_conf is not None:
            written = write_resolv_conf(resolv_conf, str(plan.gateway))
            logger.info("wrote %s", written)
    except BaseException:
        os.close(fd)
        raise
    logger.info("%s up: %s, gateway %s, mtu %d", plan.name, plan.address, plan.gateway, plan.mtu)
    return fd
