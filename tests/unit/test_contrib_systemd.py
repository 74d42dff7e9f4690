"""The systemd unit in contrib/ and the steps to install it (README and the unit's own
comment) agree with each other and with the code: paths, flags, and dirs made before use."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Final

import pytest

from nitro_netd.cli import parent, umbrella
from nitro_netd.parent.lifecycle import DEFAULT_STATE_ROOT

ROOT: Final = Path(__file__).resolve().parents[2]
UNIT_PATH: Final = ROOT / "contrib" / "systemd" / "nitro-netd-parent@.service"
INSTANCE: Final = "my-enclave"
STOCK_DIRS: Final = {"/etc/systemd/system", "/usr/local/bin"}
"""Dirs every systemd machine has; anything else the steps must create first."""

Command = list[str]


def _unit() -> dict[str, str]:
    settings = {}
    for line in UNIT_PATH.read_text(encoding="utf-8").splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings[key] = value
    return settings


def _commands(script: str) -> list[Command]:
    """Each simple command of a script (split at `&&` and `|`), without `sudo`."""
    commands: list[Command] = []
    for line in script.splitlines():
        current: Command = []
        for word in [*shlex.split(line, comments=True), "&&"]:
            if word not in ("&&", "|"):
                current.append(word)
            elif current:
                commands.append(current[1:] if current[0] == "sudo" else current)
                current = []
    return commands


def _readme_steps() -> list[Command]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n### systemd\n", 1)[1].split("\n### ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert block, "no sh block in the README's systemd section"
    return _commands(block[1])


def _unit_comment_steps() -> list[Command]:
    lines = UNIT_PATH.read_text(encoding="utf-8").splitlines()
    return _commands("\n".join(line[4:] for line in lines if line.startswith("#   ")))


STEPS: Final = {
    "readme": (_readme_steps, ROOT),
    "unit-comment": (_unit_comment_steps, UNIT_PATH.parent),
}
"""Each set of steps, and the dir its relative paths start from."""


def _steps(which: str) -> list[Command]:
    return STEPS[which][0]()


def _env_args(steps: list[Command]) -> list[str]:
    """The daemon flags the steps put in NITRO_NETD_ARGS."""
    for command in steps:
        if command[0] == "echo" and command[1].startswith("NITRO_NETD_ARGS="):
            return shlex.split(command[1].removeprefix("NITRO_NETD_ARGS="))
    raise AssertionError("the steps write no NITRO_NETD_ARGS")


def _target_dir(command: Command) -> str:
    """The dir `cp`, `ln` or `tee` writes into."""
    target = command[-1]
    return target.rstrip("/") if target.endswith("/") else str(Path(target).parent)


def test_systemd_unit_documentation_is_not_a_web_link() -> None:
    """There is no published documentation page: a URL would be a dead link."""
    assert not _unit().get("Documentation", "").startswith(("http://", "https://"))


@pytest.mark.parametrize("which", STEPS)
def test_systemd_steps_create_each_dir_before_writing_into_it(which: str) -> None:
    made = set(STOCK_DIRS)
    for command in _steps(which):
        if command[0] == "mkdir":
            made.update(arg.rstrip("/") for arg in command[1:] if not arg.startswith("-"))
        elif command[0] in ("cp", "ln", "tee"):
            assert _target_dir(command) in made, f"{shlex.join(command)}: dir not created first"


@pytest.mark.parametrize("which", STEPS)
def test_systemd_steps_use_the_unit_and_env_file_it_reads(which: str) -> None:
    steps, start = _steps(which), STEPS[which][1]
    env_file = _unit()["EnvironmentFile"].removeprefix("-").replace("%i", INSTANCE)
    copies = [command for command in steps if command[0] == "cp"]

    assert [command[-1] for command in steps if command[0] == "tee"] == [env_file]
    assert [(start / command[1]).resolve() for command in copies] == [UNIT_PATH]
    enabled = [command for command in steps if command[:2] == ["systemctl", "enable"]]
    assert enabled[0][-1] == UNIT_PATH.stem.replace("@", f"@{INSTANCE}")


@pytest.mark.parametrize("which", STEPS)
def test_systemd_unit_command_line_is_the_daemons(which: str) -> None:
    program, *args = shlex.split(_unit()["ExecStart"])
    args = [arg.replace("%i", INSTANCE) for arg in args]
    index = args.index("$NITRO_NETD_ARGS")
    args[index : index + 1] = _env_args(_steps(which))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]

    options = parent.build_parser().parse_args(args)

    assert scripts["scripts"][Path(program).name] == "nitro_netd.cli.parent:entry"
    assert options.enclave_name == INSTANCE
    assert Path("/run", _unit()["RuntimeDirectory"].replace("%i", INSTANCE)) == (
        DEFAULT_STATE_ROOT / INSTANCE
    )


def test_readme_systemd_steps_install_the_commands_they_run() -> None:
    steps = _readme_steps()
    program = shlex.split(_unit()["ExecStart"])[0]
    linked = {
        str(Path(_target_dir(command), Path(source).name))
        for command in steps
        if command[0] == "ln"
        for source in command[1:-1]
        if not source.startswith("-")
    }
    status = [command for command in steps if command[:2] == ["nitro-netd", "status"]]

    assert program in linked
    assert "/usr/local/bin/nitro-netd" in linked
    assert umbrella.build_parser().parse_args(status[0][1:]).name == INSTANCE
