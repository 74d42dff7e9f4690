"""scripts/setup runs pip only when it has to, so a second run works offline.

The script runs for real, in a scratch copy of the clone, against stand-ins for `id`,
`dpkg-query`, `apt-get` and Python (which logs how it was called and "installs" on
`pip install -e`): no root, no network, nothing installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Final

import pytest

ROOT: Final = Path(__file__).resolve().parents[2]

FAKE_PYTHON: Final = r"""#!/usr/bin/env bash
echo "$*" >>"$FAKE_LOG"
case "$1 $2" in
    "-m venv") mkdir -p .venv/bin && cp "$0" .venv/bin/python ;;
    "-m pip")
        [[ -z ${FAKE_PIP_FAILS:-} ]] || exit 1
        [[ "$*" != *" -e "* ]] || touch "$FAKE_INSTALLED" ;;
    "--version "*) echo "Python $FAKE_VERSION" ;;
    *)
        if [[ $2 != *nitro_netd* ]]; then
            echo "$FAKE_VERSION"
        elif [[ -e $FAKE_INSTALLED ]]; then
            echo "$(pwd -P)/src/nitro_netd/__init__.py"
        else
            exit 1
        fi ;;
esac
"""
FAKES: Final = {
    "python": FAKE_PYTHON,
    "id": "#!/bin/sh\necho 0\n",
    "dpkg-query": "#!/bin/sh\necho 'install ok installed'\n",
    "apt-get": "#!/bin/sh\necho 'apt-get must not run: every package is installed' >&2\nexit 1\n",
}


class Clone:
    """A scratch copy of what scripts/setup reads, with the stand-ins on PATH."""

    def __init__(self, base: Path) -> None:
        self.root = base / "clone"
        self.bin = base / "bin"
        self.log = base / "python.log"
        self.installed = base / "installed"
        (self.root / "scripts").mkdir(parents=True)
        (self.root / "src" / "nitro_netd").mkdir(parents=True)
        (self.root / "src" / "nitro_netd" / "__init__.py").touch()
        shutil.copy(ROOT / "scripts" / "setup", self.root / "scripts" / "setup")
        shutil.copy(ROOT / "pyproject.toml", self.root / "pyproject.toml")
        self.bin.mkdir()
        for name, text in FAKES.items():
            (self.bin / name).write_text(text)
            (self.bin / name).chmod(0o755)

    def setup(self, *, version: str = "3.11.7", pip_fails: bool = False) -> list[str]:
        """Run scripts/setup; return the pip commands it ran."""
        self.log.unlink(missing_ok=True)
        env = {
            **os.environ,
            "PATH": f"{self.bin}:{os.environ['PATH']}",
            "PYTHON": str(self.bin / "python"),
            "FAKE_LOG": str(self.log),
            "FAKE_INSTALLED": str(self.installed),
            "FAKE_VERSION": version,
            **({"FAKE_PIP_FAILS": "1"} if pip_fails else {}),
        }
        result = subprocess.run(
            [str(self.root / "scripts" / "setup")],
            cwd=self.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert (result.returncode != 0) == pip_fails, result.stdout + result.stderr
        calls = self.log.read_text().splitlines() if self.log.exists() else []
        return [call for call in calls if call.startswith("-m pip")]


@pytest.fixture
def clone(tmp_path: Path) -> Clone:
    return Clone(tmp_path)


def test_setup_installs_on_a_fresh_clone_and_not_again(clone: Clone) -> None:
    first = clone.setup()
    second = clone.setup()

    assert first == ["-m pip install -q --upgrade pip", "-m pip install -q -e .[test,fast]"]
    assert (clone.root / ".venv" / ".nitro-netd-setup").exists()
    assert second == []


def test_setup_installs_again_when_pyproject_changes(clone: Clone) -> None:
    clone.setup()
    with (clone.root / "pyproject.toml").open("a") as pyproject:
        pyproject.write("# a new dependency, say\n")

    assert clone.setup() != []
    assert clone.setup() == []


def test_setup_installs_again_for_another_python(clone: Clone) -> None:
    clone.setup(version="3.11.7")

    assert clone.setup(version="3.12.1") != []


def test_setup_installs_again_when_the_venv_lost_the_package(clone: Clone) -> None:
    clone.setup()
    clone.installed.unlink()

    assert clone.setup() != []


def test_setup_installs_again_after_a_failed_install(clone: Clone) -> None:
    clone.setup(pip_fails=True)

    assert clone.setup() != []
