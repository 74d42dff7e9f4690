"""The record each simulator keeps under /run/nitro-netd-sim/, so leftovers can be found.

One JSON file per simulator, written before its first namespace exists and removed after
its last trace is gone. It names the owner process (pid and start time, or none for a
simulator left running by `nitro-netd sim up`), the work dir, and every process the
simulator started; `cleanup_stale()` uses it to undo the simulators whose owner died. Next
to it, a dir of the same name holds the state of a daemon `sim up --bridge` started.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

from nitro_netd.sim.host import is_alive

STATE_DIR: Final = Path("/run/nitro-netd-sim")
ETC_NETNS: Final = Path("/etc/netns")
NAME_PREFIX: Final = "nnd"
SIM_NAME: Final = re.compile(rf"{NAME_PREFIX}-[0-9a-f]{{6}}")
NETNS_NAME: Final = re.compile(rf"(?P<sim>{SIM_NAME.pattern})-(?P<role>enclave|parent|world)")


class Role(enum.StrEnum):
    """The three namespaces of a simulator."""

    ENCLAVE = "enclave"
    """Only `lo` at first; the agent creates `tap0` here."""
    PARENT = "parent"
    """The daemon runs here; `eth0` is a veth to the world."""
    WORLD = "world"
    """Servers standing in for the internet."""


@dataclass(slots=True)
class ProcessRecord:
    """A process a simulator started, named for good by pid and start time."""

    pid: int
    start_time: int | None
    name: str


@dataclass(slots=True)
class SimState:
    """What is needed to find and undo a simulator after its owner is gone."""

    name: str
    workdir: str
    owner_pid: int | None
    """None when detached (`nitro-netd sim up`): then only `sim down` removes it."""
    owner_start_time: int | None
    processes: list[ProcessRecord] = field(default_factory=list)

    @property
    def path(self) -> Path:
        """The state file."""
        return STATE_DIR / f"{self.name}.json"

    @property
    def namespaces(self) -> dict[Role, str]:
        """Network namespace name for each role."""
        return {role: netns_name(self.name, role) for role in Role}

    @property
    def daemon_state_dir(self) -> Path:
        """The `--state-dir` of the daemon `nitro-netd sim up --bridge` starts (holding
        `default/control.sock` for `nitro-netd status`); removed with the simulator."""
        return STATE_DIR / self.name

    @property
    def link_url(self) -> str:
        """The unix socket URL standing in for vsock."""
        return f"unix://{self.workdir}/link.sock"

    def owner_alive(self) -> bool:
        """True if the process that owns this simulator still runs."""
        return self.owner_pid is not None and is_alive(self.owner_pid, self.owner_start_time)

    def save(self) -> None:
        """Write the state file atomically."""
        STATE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.path)

    def remove(self) -> None:
        """Delete the state file (nothing if it is already gone)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    @classmethod
    def load(cls, path: Path) -> SimState:
        """Read a state file.

        Raises:
            OSError, ValueError, KeyError, TypeError: the file is missing or malformed.
        """
        data = json.loads(path.read_text(encoding="utf-8"))
        processes = [ProcessRecord(**record) for record in data.pop("processes", [])]
        return cls(**data, processes=processes)


def netns_name(sim_name: str, role: Role) -> str:
    """The network namespace name of one role of a simulator."""
    return f"{sim_name}-{role}"


def list_states() -> list[SimState]:
    """All readable simulator state files, oldest name first."""
    states = []
    for path in sorted(STATE_DIR.glob(f"{NAME_PREFIX}-*.json")):
        try:
            state = SimState.load(path)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if SIM_NAME.fullmatch(state.name):
            states.append(state)
    return states


def load_state(name: str) -> SimState | None:
    """The state of the simulator called `name`, or None if there is none."""
    if not SIM_NAME.fullmatch(name):
        return None
    try:
        return SimState.load(STATE_DIR / f"{name}.json")
    except (OSError, ValueError, KeyError, TypeError):
        return None
