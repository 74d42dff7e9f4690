"""``--metrics-listen HOST:PORT``: the status snapshot as Prometheus text (GET /metrics).

A deliberately tiny HTTP/1.0-style server on asyncio: it reads the request head, answers
``GET /metrics`` with text format 0.0.4 (404 for other paths, 405 for other methods) and
closes; ``HEAD`` gets the same headers and no body. It shares `build_status` with the
control socket, so both always agree.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Any, Final

logger = logging.getLogger(__name__)

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
HEAD_TIMEOUT: Final = 5.0
MAX_HEAD: Final = 8192
PREFIX: Final = "nitro_netd_"


def parse_metrics_listen(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (meaning 127.0.0.1).

    Raises:
        ValueError: no port, or a port out of range.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"--metrics-listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9464")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port_text)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _metric(
    name: str, kind: str, help_text: str, samples: list[tuple[str, float]]
) -> Iterator[str]:
    yield f"# HELP {PREFIX}{name} {help_text}"
    yield f"# TYPE {PREFIX}{name} {kind}"
    for labels, value in samples:
        yield f"{PREFIX}{name}{labels} {_number(value)}"


def _number(value: float) -> str:
    """A sample value: integers in full (a byte counter must not round), others as repr."""
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return str(int(value))
    return repr(float(value))


def _label(key: str, value: str) -> str:
    return f'{{{key}="{_escape(value)}"}}'


def render_metrics(status: dict[str, Any]) -> str:
    """The Prometheus text exposition of one status snapshot."""
    link, counters = status["link"], status["counters"]
    lines = [
        *_metric("uptime_seconds", "gauge", "Seconds since the daemon started.", [("", status["uptime"])]),
        *_metric("link_up", "gauge", "1 while an enclave link is live.", [("", int(link["up"]))]),
        *_metric("links_accepted_total", "counter", "Links that went live.", [("", link["accepted"])]),
        *_metric("links_refused_total", "counter", "Links refused (CID pinning).", [("", link["refused"])]),
        *_metric("exposed_ports", "gauge", "Parent ports carried into the enclave.", [("", len(status["exposed"]))]),
        *_metric("flows", "gauge", "Live flows by protocol.",
                 [(_label("protocol", p), n) for p, n in status["flows"].items()]),
        *_metric("frames_total", "counter", "Link frames by direction.",
                 [(_label("direction", "from_enclave"), counters["frames_in"]),
                  (_label("direction", "to_enclave"), counters["frames_out"])]),
        *_metric("bytes_total", "counter", "Link frame bytes by direction.",
                 [(_label("direction", "from_enclave"), counters["bytes_in"]),
                  (_label("direction", "to_enclave"), counters["bytes_out"])]),
        *_metric("drops_total", "counter", "Dropped frames by reason.",
                 [(_label("reason", r), n) for r, n in counters["drops"].items()]),
        *_metric("tcp_recovery_total", "counter",
                 "TCP translator recovery events towards the enclave (retransmissions, probes, give-ups).",
                 [(_label("event", e), n) for e, n in counters.get("tcp", {}).items()]),
        *_metric("busy_poll_seconds_total", "counter",
                 "Wall seconds the event loop was kept from sleeping, work included (--busy-poll-us).",
                 [("", status["busy_poll"]["seconds"])]),
        *_metric("spliced_bytes_total", "counter",
                 "Bytes from the world spliced into pipes for the link instead of copied.",
                 [("", status["splice"]["bytes"])]),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def _response(
    status: str,
    body: str,
    content_type: str = "text/plain; charset=utf-8",
    *,
    head_only: bool = False,
) -> bytes:
    """The response bytes; `head_only` (a HEAD request): the headers a GET gets, no body."""
    data = body.encode()
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + (b"" if head_only else data)


class MetricsServer:
    """Serves GET /metrics; see the module docstring."""

    def __init__(self, host: str, port: int, get_status: Callable[[], dict[str, Any]]) -> None:
        self.host, self.port = host, port
        self._get_status = get_status
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Bind and listen.

        Raises:
            OSError: with a message naming the address (e.g. in use).
        """
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port)
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot serve metrics on {self.host}:{self.port}: {exc.strerror}"
            ) from exc
        logger.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def close(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            writer.write(self.answer(head[:MAX_HEAD]))
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    def answer(self, head: bytes) -> bytes:
        """The HTTP response to one request head."""
        method, _, rest = head.decode("latin-1").partition(" ")
        path = rest.partition(" ")[0]
        head_only = method == "HEAD"
        if method not in ("GET", "HEAD"):
            return _response("405 Method Not Allowed", "use GET /metrics\n")
        if path.split("?")[0] != "/metrics":
            return _response("404 Not Found", "try /metrics\n", head_only=head_only)
        body = render_metrics(self._get_status())
        return _response("200 OK", body, CONTENT_TYPE, head_only=head_only)
