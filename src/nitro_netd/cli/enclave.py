"""``nitro-netd-enclave``: give an AWS Nitro Enclave a network over vsock.

Plain invocation creates and configures the TAP, writes resolv.conf and keeps the link to
the parent up forever (SIGTERM or SIGINT exits 0). ``run [options] -- CMD ARGS...`` does
the same in a child process, waits for the first link-up, runs CMD, forwards SIGTERM,
SIGINT and SIGHUP to it, and exits with its status.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Final

from nitro_netd.cli.common import LOG_LEVELS, fail, mtu_argument, setup_logging
from nitro_netd.enclave import _process
from nitro_netd.enclave.agent import Agent, AgentConfig, AgentError
from nitro_netd.enclave.netconfig import (
    DefaultRoute,
    InterfacePlan,
    NetConfigError,
    read_default_routes,
    restore_default_routes,
)
from nitro_netd.enclave.resolv import (
    DEFAULT_RESOLV_CONF,
    ResolvConfError,
    check_resolv_conf,
    read_resolv_conf,
    restore_resolv_conf,
)
from nitro_netd.enclave.setup import bring_up_network
from nitro_netd.enclave.tap import (
    DEFAULT_TAP_NAME,
    TapError,
    build_ifreq,
    has_vnet_hdr,
    open_tap,
)
from nitro_netd.link import DEFAULT_MTU, LinkProtocol
from nitro_netd.transport import Endpoint, EndpointError, Scheme, parse_endpoint

PROG: Final = "nitro-netd-enclave"
logger = logging.getLogger("nitro_netd.enclave")
DEFAULT_PARENT: Final = "vsock://3:1024"
DEFAULT_LINK_TIMEOUT: Final = 30.0
AGENT_STOP_GRACE: Final = 5.0
FORWARDED_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
AGENT_STOP_SIGNAL: Final = signal.SIGUSR1
"""How ``run`` stops its agent child, which ignores the signals a whole process group gets
(Ctrl-C, ``kill -- -PGID``, systemd's stop): those are for the command, which keeps its
network while it shuts down."""

EPILOG: Final = """\
examples:
  nitro-netd-enclave                         # in the enclave: tap0, link to vsock://3:1024
  nitro-netd-enclave --mtu 9001 --log-level debug
  nitro-netd-enclave run -- python3 app.py   # network up, then run the app; exit with its status
  nitro-netd-enclave run --link-timeout 10 -- curl -sS https://example.com

The agent reconnects forever (backoff 0.05 s doubling to 2 s), keeping the TAP and its
address 192.168.127.2/24 (gateway and DNS 192.168.127.1). "link up: ..." in the log marks
each new link. Needs root and /dev/net/tun.

It is meant for an enclave, which has no other network: where a default route exists
already it refuses to start unless given --replace-default-route (the route and
/etc/resolv.conf are then taken over while it runs and put back when it exits, unless it is
killed with SIGKILL). To try the bridge on one machine, use the simulator:
`nitro-netd sim up --bridge`.
"""


@dataclass(frozen=True, slots=True)
class EnclaveOptions:
    """Everything the command line asks for, parsed and checked."""

    agent: AgentConfig
    plan: InterfacePlan
    resolv_conf: str | None
    log_level: str = "info"
    command: tuple[str, ...] | None = None
    """For ``run``: the command to start once the link is up; None for the plain agent."""
    link_timeout: float = DEFAULT_LINK_TIMEOUT
    link_up_fd: int | None = None
    replace_default_route: bool = False
    """Start even where another default route exists (it is put back on exit)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    try:
        options = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # argparse has printed usage and a one-line error, or --help
        return exc.code if isinstance(exc.code, int) else 2
    setup_logging(PROG, options.log_level)
    with _signal_handlers(FORWARDED_SIGNALS, _interrupt):  # until the phases' own handlers
        return _main(options)


def _main(options: EnclaveOptions) -> int:
    if options.resolv_conf is not None:
        try:
            check_resolv_conf(options.resolv_conf)  # before the TAP: fail with nothing done
        except ResolvConfError as exc:
            return fail(PROG, str(exc))
    original_resolv_conf = read_resolv_conf(options.resolv_conf) if options.resolv_conf else None
    tap_fd: int | None = None
    restore = options.resolv_conf is not None
    previous_routes = _routes_to_put_back(options)
    if isinstance(previous_routes, str):
        return fail(PROG, previous_routes)
    try:
        try:
            tap_fd = bring_up_network(options.plan, options.resolv_conf, tap_opener=open_tap)
        except (TapError, NetConfigError, ResolvConfError) as exc:
            restore = False  # resolv.conf is written last: this failure left it alone
            return fail(PROG, str(exc))
        if options.command is None:
            return run_agent(options, tap_fd)
        return run_command(options, tap_fd)
    except Interrupted as exc:  # a signal during set-up or the wait for the link
        logger.info("%s", exc)
        return exc.status
    finally:
        if tap_fd is not None:
            os.close(tap_fd)  # the TAP goes, and the default route through it
        if restore:  # also after an interrupted set-up
            _restore_resolv_conf(options, original_resolv_conf)
        if previous_routes:  # also after a failed or interrupted set-up
            _restore_default_routes(options, previous_routes)


def _routes_to_put_back(options: EnclaveOptions) -> list[DefaultRoute] | str:
    """The default routes the agent's own will replace, to put back on exit (none in an
    enclave), or why it must not start: a namespace with a default route is not an
    enclave's, unless the user says so (--replace-default-route)."""
    try:
        routes = _default_routes_to_keep(options.plan)
    except NetConfigError as exc:
        if not options.replace_default_route:  # unknown: as if one were there
            return f"{exc}; pass --replace-default-route to start all the same"
        logger.warning("%s: none will be put back when the agent exits", exc)
        return []
    if routes and not options.replace_default_route:
        return _not_an_enclave(routes)
    if any(route.multipath for route in routes):
        return (
            "the default route is a multipath one, which the agent could not put back: "
            "give it a network namespace of its own"
        )
    if routes:
        logger.info(
            "replacing the default route %s (put back when the agent exits)",
            ", ".join(route.describe() for route in routes),
        )
    return routes


def _not_an_enclave(routes: list[DefaultRoute]) -> str:
    shown = ", ".join(route.describe() for route in routes)
    return (
        f"this network namespace has a default route already ({shown}), so it is not an "
        "enclave's: the agent would take it over. Pass --replace-default-route to do so "
        "anyway (it is put back when the agent exits), or try the bridge in the simulator: "
        "nitro-netd sim up --bridge"
    )


def _default_routes_to_keep(plan: InterfacePlan) -> list[DefaultRoute]:
    """The default routes (not through the gateway) that the TAP's own is about to
    replace: none in an enclave; elsewhere, they are put back when the agent exits.

    Raises:
        NetConfigError: they cannot be read.
    """
    return [route for route in read_default_routes() if route.gateway != str(plan.gateway)]


def _restore_default_routes(options: EnclaveOptions, previous: list[DefaultRoute]) -> None:
    try:
        logger.info("%s", restore_default_routes(previous, options.plan.gateway))
    except NetConfigError as exc:
        logger.warning("%s", exc)


def _restore_resolv_conf(options: EnclaveOptions, original: bytes | None) -> None:
    assert options.resolv_conf is not None
    try:
        logger.info(
            "%s",
            restore_resolv_conf(options.resolv_conf, original, str(options.plan.gateway)),
        )
    except ResolvConfError as exc:
        logger.warning("%s", exc)


class Interrupted(Exception):
    """A signal (SIGTERM, SIGINT, SIGHUP) ended set-up or the wait for the link: clean up
    (resolv.conf) and exit 128 + its number, as a shell reports it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.status = 128 + signum


def _interrupt(signum: int, frame: object) -> None:
    for other in FORWARDED_SIGNALS:  # a second Ctrl-C must not break the clean-up
        signal.signal(other, signal.SIG_IGN)
    raise Interrupted(signum)


def entry() -> None:
    """Console-script entry point."""
    raise SystemExit(main())


# --- parsing ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> EnclaveOptions:
    """Parse the command line (plain or ``run`` form) into options.

    Raises:
        SystemExit: bad arguments (after argparse printed a one-line error) or --help.
    """
    args = list(argv)
    where = find_subcommand(args)
    if where is not None:
        parser = build_run_parser()
        own, command = _split_command(args[:where] + args[where + 1 :])
        ns = parser.parse_args(own)
        command = command if command is not None else ns.command
        if not command:
            parser.error("run needs a command: nitro-netd-enclave run [OPTIONS] -- CMD [ARGS...]")
        return _options(ns, tuple(command))
    ns = build_parser().parse_args(args)
    return _options(ns, None)


_VALUE_OPTIONS: Final = frozenset(
    {"--parent", "--mtu", "--protocol", "--tap", "--resolv-conf", "--link-up-fd", "--log-level",
     "--link-timeout"}
)  # fmt: skip
"""Options that take the next argument as their value (abbreviations are not allowed)."""


def find_subcommand(args: Sequence[str]) -> int | None:
    """Return the index of ``run`` among our options (before any ``--``), or None."""
    expect_value = False
    for index, arg in enumerate(args):
        if expect_value:
            expect_value = False
        elif arg == "--":
            return None
        elif arg.startswith("-"):
            expect_value = arg in _VALUE_OPTIONS
        else:
            return index if arg == "run" else None
    return None


def _split_command(args: list[str]) -> tuple[list[str], list[str] | None]:
    """Split ``OPTIONS -- CMD ARGS`` at the first ``--``."""
    if "--" in args:
        index = args.index("--")
        return args[:index], args[index + 1 :]
    return args, None


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the plain (run forever) form."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        usage=f"{PROG} [OPTIONS]\n       {PROG} run [OPTIONS] [--link-timeout S] -- CMD [ARGS...]",
        description="Give an AWS Nitro Enclave IP networking through its parent instance: "
        "create a TAP device, configure it and pump its frames over vsock to "
        "nitro-netd-parent (or a gvproxy).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    _add_common_options(parser)
    return parser


def build_run_parser() -> argparse.ArgumentParser:
    """Return the parser of the ``run -- CMD`` form."""
    parser = argparse.ArgumentParser(
        prog=f"{PROG} run",
        usage=f"{PROG} run [OPTIONS] [--link-timeout S] -- CMD [ARGS...]",
        description="Bring the network up, wait for the link to the parent, run CMD, and "
        "exit with CMD's status (128+N if killed by signal N). SIGTERM, SIGINT and SIGHUP "
        "are forwarded to CMD.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    _add_common_options(parser)
    parser.add_argument(
        "--link-timeout",
        type=_positive_float,
        default=DEFAULT_LINK_TIMEOUT,
        metavar="SECONDS",
        help="give up if the link is not up within this time (default: %(default)s)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run")
    return parser


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--parent", type=_parent_endpoint, default=DEFAULT_PARENT, metavar="URL",
        help="where nitro-netd-parent listens: vsock://CID:PORT or unix:///PATH "
        "(default: %(default)s)")  # fmt: skip
    add("--mtu", type=mtu_argument, default=DEFAULT_MTU, metavar="N",
        help="TAP MTU with a parent that does not state one (a stock gvproxy, passt); "
        "nitro-netd-parent states its own, which the TAP then takes (default: %(default)s)")  # fmt: skip
    add("--protocol", choices=[p.value for p in LinkProtocol], default=LinkProtocol.GVPROXY.value,
        help="link framing: gvproxy (HTTP handshake, 16-bit lengths) or qemu "
        "(32-bit lengths) (default: %(default)s)")  # fmt: skip
    add("--tap", type=_tap_name, default=DEFAULT_TAP_NAME, metavar="NAME",
        help="TAP interface name (default: %(default)s)")  # fmt: skip
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resolv-conf", default=DEFAULT_RESOLV_CONF, metavar="PATH",
        help="resolv.conf to point at the gateway's DNS (default: %(default)s)")  # fmt: skip
    group.add_argument("--no-resolv-conf", action="store_true",
        help="leave resolv.conf alone")  # fmt: skip
    add("--no-offload", action="store_true",
        help="never ask the parent for checksum offload (by default the agent asks "
        "nitro-netd-parent, and uses it when the parent agrees)")  # fmt: skip
    add("--no-tso", action="store_true",
        help="never ask for TCP segmentation offload (by default asked for with checksum "
        "offload: super-segments up to 64 KiB cross the link whatever the MTU)")  # fmt: skip
    add("--link-up-fd", type=_link_up_fd, default=None, metavar="FD",
        help="write one byte to this open descriptor each time the link comes up "
        "(for supervisors)")  # fmt: skip
    add("--log-level", choices=LOG_LEVELS, default="info",
        help="log verbosity (default: %(default)s)")  # fmt: skip
    add("--replace-default-route", action="store_true",
        help="start even where a default route exists already (not in an enclave, which "
        "has none): replace it while the agent runs, put it back when it exits")  # fmt: skip


def _options(ns: argparse.Namespace, command: tuple[str, ...] | None) -> EnclaveOptions:
    agent = AgentConfig(
        endpoint=ns.parent,
        protocol=LinkProtocol(ns.protocol),
        mtu=ns.mtu,
        offload=not ns.no_offload,
        tso=not ns.no_tso,
    )
    return EnclaveOptions(
        agent=agent,
        plan=InterfacePlan(name=ns.tap, mtu=ns.mtu),
        resolv_conf=None if ns.no_resolv_conf else ns.resolv_conf,
        log_level=ns.log_level,
        command=command,
        link_timeout=getattr(ns, "link_timeout", DEFAULT_LINK_TIMEOUT),
        link_up_fd=ns.link_up_fd,
        replace_default_route=ns.replace_default_route,
    )


def _parent_endpoint(text: str) -> Endpoint:
    try:
        endpoint = parse_endpoint(text)
    except EndpointError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if endpoint.scheme is Scheme.VSOCK and endpoint.cid is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is a listen address; the agent connects: use vsock://3:{endpoint.port}"
        )
    return endpoint


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be positive")
    return value


def _tap_name(text: str) -> str:
    try:
        build_ifreq(text)
    except TapError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _link_up_fd(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a descriptor number")
    try:
        os.fstat(int(text))
    except OSError:
        raise argparse.ArgumentTypeError(f"descriptor {text} is not open") from None
    return int(text)


# --- running ---------------------------------------------------------------------------


def run_agent(options: EnclaveOptions, tap_fd: int) -> int:
    """Run the agent in this process until SIGTERM or SIGINT; return the exit status."""
    link_up_fds = _link_up_fds(options)
    agent = Agent(options.agent, tap_fd, link_up_fds=link_up_fds, vnet_hdr=has_vnet_hdr(tap_fd))
    stop: Callable[[int, object], None] = lambda signum, frame: agent.stop()  # noqa: E731
    try:
        with _signal_handlers(FORWARDED_SIGNALS, stop):
            agent.run_forever()
    except AgentError as exc:
        return fail(PROG, str(exc))
    finally:
        agent.close()
    return 0


def run_command(options: EnclaveOptions, tap_fd: int) -> int:
    """Start the agent in a child, wait for the link, run the command; return its status."""
    assert options.command is not None
    read_fd, write_fd = os.pipe()
    user_fds = _link_up_fds(options)
    run_pid = os.getpid()
    agent = _process.spawn(
        "agent",
        lambda: _agent_child(options, tap_fd, (write_fd, *user_fds), run_pid),
        (tap_fd, write_fd, *user_fds),
    )
    os.close(write_fd)
    try:
        problem = _wait_link_up(read_fd, agent, options)
        if problem is not None:
            return fail(PROG, problem)
        return _run_child_command(options.command)
    finally:
        _process.finish(agent, AGENT_STOP_GRACE, stop_signal=AGENT_STOP_SIGNAL)
        os.close(read_fd)


def _link_up_fds(options: EnclaveOptions) -> tuple[int, ...]:
    """The user's --link-up-fd, if any, made non-blocking (a stalled reader never stalls
    the agent)."""
    if options.link_up_fd is None:
        return ()
    os.set_blocking(options.link_up_fd, False)
    return (options.link_up_fd,)


def _agent_child(
    options: EnclaveOptions, tap_fd: int, link_up_fds: tuple[int, ...], run_pid: int
) -> str:
    """The agent process of ``run``: runs until `AGENT_STOP_SIGNAL` (or ``run``'s end),
    reports how it ended (its first link-up descriptor tells ``run`` the link is up; the
    others are the user's)."""
    os.set_blocking(link_up_fds[0], False)
    agent = Agent(
        replace(options.agent), tap_fd, link_up_fds=link_up_fds, vnet_hdr=has_vnet_hdr(tap_fd)
    )
    # Signals for the whole group (Ctrl-C, kill -- -PGID) are for the command: run stops
    # the agent after it. Its own group keeps them from its pump children too.
    signal.signal(AGENT_STOP_SIGNAL, lambda signum, frame: agent.stop())
    _process.die_with_parent(AGENT_STOP_SIGNAL)  # before SIGTERM (the default) is ignored
    os.setpgid(0, 0)
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if os.getppid() != run_pid:  # run died before the request took effect
        return "stopped"
    try:
        agent.run_forever()
    except AgentError as exc:
        return str(exc)
    return "stopped"


def _wait_link_up(read_fd: int, agent: _process.Child, options: EnclaveOptions) -> str | None:
    """Wait for the agent's first link-up byte; return an error message if none came."""
    deadline = time.monotonic() + options.link_timeout
    while (remaining := deadline - time.monotonic()) > 0:
        if not select.select([read_fd], [], [], remaining)[0]:
            continue
        if os.read(read_fd, 1):
            return None
        report = _process.read_report(agent, AGENT_STOP_GRACE) or "no reason given"
        return f"the agent exited before the link came up: {report}"
    return (
        f"the link to {options.agent.endpoint} did not come up within "
        f"{options.link_timeout:g} s: start nitro-netd-parent (or check --parent), "
        "or raise --link-timeout"
    )


def _run_child_command(command: Sequence[str]) -> int:
    """Run `command`, forwarding signals to it; return its shell-style exit status."""
    try:
        child = subprocess.Popen(command)
    except FileNotFoundError:
        return fail(PROG, f"{command[0]}: command not found", 127)
    except PermissionError:
        return fail(PROG, f"{command[0]}: permission denied", 126)
    except OSError as exc:  # e.g. ENOEXEC: not a program this kernel can run
        return fail(PROG, f"{command[0]}: {exc.strerror or exc}", 126)
    forward: Callable[[int, object], None] = lambda signum, frame: child.send_signal(signum)  # noqa: E731
    with _signal_handlers(FORWARDED_SIGNALS, forward):
        status = child.wait()
    return _shell_status(status)


def _shell_status(returncode: int) -> int:
    """Return a shell's exit status for a child's return code (128+N if killed by N)."""
    return returncode if returncode >= 0 else 128 - returncode


@contextlib.contextmanager
def _signal_handlers(
    signals: Sequence[int], handler: Callable[[int, object], None]
) -> Iterator[None]:
    previous = {signum: signal.signal(signum, handler) for signum in signals}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


if __name__ == "__main__":
    entry()
