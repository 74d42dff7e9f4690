"""Find and remove what dead simulators left behind, and remove simulators by name."""

from __future__ import annotations

import shutil

from nitro_netd.sim.host import SimError, list_netns
from nitro_netd.sim.state import ETC_NETNS, NETNS_NAME, SimState, list_states, load_state
from nitro_netd.sim.topology import remove_netns, teardown


def cleanup_stale(*, include_detached: bool = False) -> list[str]:
    """Remove the simulators whose owner process is gone.

    Also removes `nnd-XXXXXX-{enclave,parent,world}` namespaces and /etc/netns dirs that no
    state file claims (a simulator records its state before creating anything, so these
    are leftovers of a crash). Simulators of live owners are never touched.

    Args:
        include_detached: also remove simulators left running by `nitro-netd sim up`.

    Returns:
        The names of the simulators removed.
    """
    removed = []
    for state in list_states():
        detached = state.owner_pid is None
        if state.owner_alive() or (detached and not include_detached):
            continue
        teardown(state)
        removed.append(state.name)
    claimed = {state.name for state in list_states()}
    for netns in list_netns():
        match = NETNS_NAME.fullmatch(netns)
        if match and match["sim"] not in claimed:
            remove_netns(netns)
            removed.append(match["sim"])
    if ETC_NETNS.is_dir():
        for etc in ETC_NETNS.iterdir():
            match = NETNS_NAME.fullmatch(etc.name)
            if match and match["sim"] not in claimed:
                shutil.rmtree(etc, ignore_errors=True)
    return sorted(set(removed))


def destroy(name: str, *, force: bool = False) -> list[str]:
    """Remove the simulator called `name` (detached, or whose owner is gone).

    Args:
        force: remove it even if the process that owns it still runs.

    Returns:
        Lines describing anything that could not be removed.

    Raises:
        SimError: no such simulator, or it is owned by a running process and not `force`.
    """
    state = load_state(name)
    if state is None:
        raise SimError(f"no simulator named {name!r}: see `nitro-netd sim list`")
    if state.owner_alive() and not force:
        raise SimError(
            f"{name} belongs to running process {state.owner_pid}: stop that process "
            "(it cleans up) or use --force"
        )
    return teardown(state)


def describe(state: SimState) -> str:
    """One word for a simulator's status: detached, running (owner alive) or stale."""
    if state.owner_pid is None:
        return "detached"
    return "running" if state.owner_alive() else "stale"
