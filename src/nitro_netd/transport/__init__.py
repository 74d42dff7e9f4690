"""Link transports (vsock, unix) from URLs."""

from __future__ import annotations

from nitro_netd.transport.endpoint import (
    Endpoint,
    EndpointError,
    Scheme,
    connect,
    open_listener,
    parse_endpoint,
    peer_cid,
    tune_accepted_link_socket,
    tune_link_socket,
)

__all__ = [
    "Endpoint",
    "EndpointError",
    "Scheme",
    "connect",
    "open_listener",
    "parse_endpoint",
    "peer_cid",
    "tune_accepted_link_socket",
    "tune_link_socket",
]
