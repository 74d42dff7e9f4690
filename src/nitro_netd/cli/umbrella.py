"""`nitro-netd`: the umbrella command (the local simulator and a demo).

The daemon and the agent have their own commands, `nitro-netd-parent` and
`nitro-netd-enclave`; this one is for trying them out on one Linux machine.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from nitro_netd.cli import status as status_cmd
from nitro_netd.cli.common import fail, mtu_argument
from nitro_netd.cli.demo import demo
from nitro_netd.sim import (
    ENCLAVE_ADDRESS,
    GATEWAY_ADDRESS,
    PARENT_ADDRESS,
    WORLD_ADDRESS,
    Role,
    SimError,
    SimState,
    Simulator,
    cleanup_stale,
    describe,
    destroy,
    list_states,
    load_state,
    require_host,
    run_foreground,
)
from nitro_netd.sim.foreground import INTERRUPT_GRACE, command_problem
from nitro_netd.sim.state import STATE_DIR

PROG: Final = "nitro-netd"
LINK_TIMEOUT: Final = 15.0
ROLE_NOTES: Final = {
    Role.ENCLAVE: f"tap0 {ENCLAVE_ADDRESS}/24 (made by the agent), gateway {GATEWAY_ADDRESS}",
    Role.PARENT: f"eth0 {PARENT_ADDRESS}, the daemon",
    Role.WORLD: f"eth0 {WORLD_ADDRESS}, the internet",
}

EPILOG: Final = f"""\
examples:
  sudo nitro-netd demo                     show the bridge at work in a simulator, clean up
  sim=$(sudo nitro-netd sim up --bridge)   leave one running with daemon and agent: its name
  sudo nitro-netd sim exec $sim enclave -- ping -c 3 {GATEWAY_ADDRESS}
  sudo nitro-netd status --state-dir {STATE_DIR}/$sim
  sudo nitro-netd sim list
  sudo nitro-netd sim down $sim            (or: sim down --all)

The simulator is three network namespaces: "enclave" (the agent makes tap0 there,
{ENCLAVE_ADDRESS}/24, gateway {GATEWAY_ADDRESS}), "parent" (the daemon; eth0 {PARENT_ADDRESS}) and
"world" ({WORLD_ADDRESS}, standing in for the internet). A unix socket replaces vsock.
"""


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser (kept separate so it can be tested)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Try nitro-netd on one Linux machine with network namespaces (needs root).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="show the bridge at work in a simulator, then tear it down"
    )
    demo.add_argument("--mtu", type=mtu_argument, help="link MTU for the daemon and the agent")
    sim = commands.add_parser("sim", help="manage simulators").add_subparsers(
        dest="sim_command", required=True, metavar="SUBCOMMAND"
    )
    up = sim.add_parser("up", help="build a simulator and leave it running; print its name")
    up.add_argument(
        "--bridge",
        action="store_true",
        help=f"also start the daemon (--state-dir {STATE_DIR}/NAME) and the agent, wait for the link",
    )
    up.add_argument("--mtu", type=mtu_argument, help="with --bridge: link MTU for both")
    down = sim.add_parser("down", help="remove a simulator")
    down.add_argument("name", nargs="?", help="simulator name (see `sim list`)")
    down.add_argument("--all", action="store_true", help="remove every detached or stale one")
    down.add_argument("--force", action="store_true", help="even if its owner process runs")
    run = sim.add_parser(
        "exec",
        help="run a command inside one of a simulator's namespaces "
        f"(after Ctrl-C it has {INTERRUPT_GRACE:g} s to exit)",
    )
    run.add_argument("name", help="simulator name (see `sim list`)")
    run.add_argument("role", choices=[role.value for role in Role])
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND...")
    sim.add_parser("list", help="list simulators and their status")
    status_cmd.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `nitro-netd`; return its exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "status":
            return status_cmd.run(args)
        if args.command == "demo":
            return demo(args.mtu)
        handler = {"up": sim_up, "down": sim_down, "exec": sim_exec, "list": sim_list}
        return handler[args.sim_command](args)
    except SimError as exc:
        return fail(PROG, str(exc).splitlines()[0])
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; cleaned up", file=sys.stderr)
        return 130
    except OSError as exc:
        return fail(PROG, f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))


def entry() -> None:
    """Console-script entry point."""
    raise SystemExit(main())


# -- sim subcommands -------------------------------------------------------------------


def sim_up(args: argparse.Namespace) -> int:
    """Build a simulator, optionally start the bridge, and leave it running.

    Only the name goes to stdout (`sim=$(nitro-netd sim up)`); what it is and how to use
    it go to stderr.
    """
    if args.mtu and not args.bridge:
        return fail(PROG, "--mtu is the daemon's and the agent's: it needs --bridge", 2)
    require_host()
    _report_stale(cleanup_stale())
    with Simulator() as sim:
        if args.bridge:
            mtu_args = ["--mtu", str(args.mtu)] if args.mtu else []
            sim.start_parent([*mtu_args, "--state-dir", str(sim.daemon_state_dir)])
            sim.start_agent(mtu_args).wait_for_log("link up", LINK_TIMEOUT)
        state = sim.detach()
    _describe_up(state, bridge=args.bridge)
    print(state.name)
    return 0


def _describe_up(state: SimState, *, bridge: bool) -> None:
    me = _invocation()
    say = functools.partial(print, file=sys.stderr)
    say(f"simulator {state.name} is up" + (", with the daemon and the agent" if bridge else ""))
    for role, netns in state.namespaces.items():
        say(f"  {role.value:<8} netns {netns:<20} {ROLE_NOTES[role]}")
    say(f"  link     {state.link_url}")
    say(f"  logs     {state.workdir}/logs/")
    if bridge:
        say(f"status:    {me} status --state-dir {state.daemon_state_dir}")
        say(f"run in it: {me} sim exec {state.name} enclave -- ping -c 3 {GATEWAY_ADDRESS}")
    else:
        say(f"run in it: {me} sim exec {state.name} enclave -- ip addr")
    say(f"remove it: {me} sim down {state.name}")


def _invocation() -> str:
    """How a shell runs this command: `nitro-netd` if that is on PATH, else a full path."""
    if shutil.which(PROG):
        return PROG
    script = Path(sys.executable).with_name(PROG)
    if os.access(script, os.X_OK):
        return str(script)
    return f"{sys.executable} -m nitro_netd.cli.umbrella"


def sim_down(args: argparse.Namespace) -> int:
    """Remove one simulator, or every detached and stale one."""
    require_host()
    if args.all:
        removed = cleanup_stale(include_detached=True)
        print("removed: " + (", ".join(removed) if removed else "nothing"))
        return 0
    if not args.name:
        return fail(PROG, "name a simulator (see `nitro-netd sim list`) or use --all", 2)
    problems = destroy(args.name, force=args.force)
    for problem in problems:
        print(f"{PROG}: warning: {problem}", file=sys.stderr)
    print(f"removed {args.name}")
    return 1 if problems else 0


def sim_exec(args: argparse.Namespace) -> int:
    """Run a command in a namespace of a simulator, passing its exit status through.

    After Ctrl-C the command has 10 s to exit, then it is killed, and what it started with
    it (`run_foreground`). A command that cannot be found exits 127, one that cannot be run
    126, as in a shell.
    """
    require_host()
    command = list(args.argv)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        return fail(PROG, "give the command after --, e.g. `-- ip addr`", 2)
    state = load_state(args.name)
    if state is None:
        return fail(PROG, f"no simulator named {args.name!r}: see `nitro-netd sim list`")
    problem = command_problem(command[0])
    if problem is not None:
        return fail(PROG, *problem)
    netns = state.namespaces[Role(args.role)]
    status = run_foreground(["ip", "netns", "exec", netns, *command])
    return 128 - status if status < 0 else status


def sim_list(args: argparse.Namespace) -> int:
    """Print each simulator with its status, owner and work dir."""
    states = list_states()
    if not states:
        print("no simulators")
        return 0
    print(f"{'NAME':<12} {'STATUS':<9} {'OWNER':<8} WORKDIR")
    for state in states:
        owner = str(state.owner_pid) if state.owner_pid is not None else "-"
        print(f"{state.name:<12} {describe(state):<9} {owner:<8} {state.workdir}")
    return 0


def _report_stale(removed: list[str]) -> None:
    if removed:
        print(f"(removed leftovers of dead simulators: {', '.join(removed)})", file=sys.stderr)


if __name__ == "__main__":
    entry()
