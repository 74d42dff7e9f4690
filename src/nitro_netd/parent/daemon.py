"""Run the parent daemon: listen for the enclave's link and serve it until told to stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

from nitro_netd.netstack import StackConfig
from nitro_netd.parent.bridge import Bridge
from nitro_netd.parent.expose import ExposeSpec, TcpExposer
from nitro_netd.parent.host_ping import HostPing
from nitro_netd.parent.host_tcp import HostTcp
from nitro_netd.parent.host_udp import HostUdp
from nitro_netd.parent.resolvconf import with_parent_resolvers
from nitro_netd.transport import Endpoint, open_listener, parse_endpoint

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Everything `run()` needs, built from the command line."""

    listen: Endpoint = field(default_factory=lambda: parse_endpoint("vsock://:1024"))
    """Where agents connect."""
    stack: StackConfig = field(default_factory=StackConfig)
    """The netstack's address plan, MTU, limits and timeouts."""
    exposes: tuple[ExposeSpec, ...] = ()
    """Parent ports carried into the enclave (--expose)."""


async def serve(
    config: DaemonConfig, stop: asyncio.Event, on_ready: Callable[[], None] | None = None
) -> None:
    """Listen and bridge until `stop` is set; call `on_ready` once listening.

    Raises:
        OSError: the listener cannot be opened (message names the endpoint).
    """
    loop = asyncio.get_running_loop()
    bridge = Bridge(with_parent_resolvers(config.stack), loop)
    host_tcp = HostTcp(loop, bridge.post_event)
    bridge.add_host_side(host_tcp)
    bridge.add_host_side(HostUdp(loop, bridge.post_event))
    bridge.add_host_side(HostPing(loop, bridge.post_event))
    exposer = TcpExposer(
        loop, host_tcp.adopt, bridge.post_event, lambda: bridge.session is not None
    )
    exposer.open(config.exposes)
    try:
        listener = open_listener(config.listen)
    except OSError:
        exposer.close()
        raise
    server = await loop.create_server(bridge.new_session, sock=listener)
    logger.info("listening on %s (mtu %d)", config.listen, config.stack.mtu)
    if on_ready is not None:
        on_ready()
    try:
        await stop.wait()
    finally:
        logger.info("stopping")
        server.close()
        exposer.close()
        bridge.close()
        await server.wait_closed()
        _remove_unix_socket(config.listen)
        logger.info("counters: %s", bridge.stack.stats.snapshot())


def _remove_unix_socket(endpoint: Endpoint) -> None:
    if endpoint.path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(endpoint.path)


def run(config: DaemonConfig) -> int:
    """Run the daemon in the foreground until SIGTERM or SIGINT; return the exit status."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve(config, stop)

    asyncio.run(main())
    return 0
