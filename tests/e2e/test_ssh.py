"""A real program through an exposed port: OpenSSH in the enclave, exposed as 2222:22."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from nitro_netd.sim import Simulator

from .helpers import LINK_TIMEOUT, wait_for_log, wait_for_ping, wait_until

pytestmark = [
    pytest.mark.netns("ssh", "scp", "ssh-keygen", "/usr/sbin/sshd"),
    pytest.mark.timeout(180),
]

PARENT_ETH0 = "198.18.0.1"


def _sshd_files(workdir: Path) -> tuple[Path, Path]:
    """A host key, a client key authorised for root, and an sshd config; all in `workdir`."""
    ssh_dir = workdir / "ssh"
    ssh_dir.mkdir(mode=0o700)
    for name in ("host_key", "client_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh_dir / name)], check=True
        )
    (ssh_dir / "authorized_keys").write_text((ssh_dir / "client_key.pub").read_text())
    config = ssh_dir / "sshd_config"
    config.write_text(
        "Port 22\nListenAddress 0.0.0.0\n"
        f"HostKey {ssh_dir / 'host_key'}\nAuthorizedKeysFile {ssh_dir / 'authorized_keys'}\n"
        f"PidFile {ssh_dir / 'sshd.pid'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUsePAM no\nStrictModes no\n"
        "Subsystem sftp internal-sftp\n"
    )
    return config, ssh_dir / "client_key"


def _ssh_options(key: Path) -> list[str]:
    return [
        "-i", str(key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
    ]  # fmt: skip


def test_ssh_and_scp_from_world_to_sshd_in_enclave_via_exposed_port(sim: Simulator) -> None:
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    config, key = _sshd_files(sim.workdir)
    sim.start_parent(["--expose", "2222:22"])
    agent = sim.start_agent()
    wait_for_log(sim, agent, "link up", LINK_TIMEOUT)
    wait_for_ping(sim)
    sim.spawn("sshd", "enclave", ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)])

    def ssh_works() -> bool:
        argv = [
            "ssh",
            *_ssh_options(key),
            "-p",
            "2222",
            f"root@{PARENT_ETH0}",
            "echo",
            "hello-from-enclave",
        ]
        result = sim.run("world", argv, timeout=30)
        return "hello-from-enclave" in result.stdout

    wait_until(sim, ssh_works, 20, "ssh through the exposed port")

    payload = sim.workdir / "payload.bin"
    data = os.urandom(48 << 20)
    payload.write_bytes(data)
    target = sim.workdir / "received.bin"
    scp = ["scp", *_ssh_options(key), "-P", "2222", str(payload), f"root@{PARENT_ETH0}:{target}"]
    result = sim.run("world", scp, timeout=120)
    assert result.returncode == 0, result.stderr + sim.logs_tail()
    digest = sim.run("enclave", ["sha256sum", str(target)]).stdout.split()[0]
    assert digest == hashlib.sha256(data).hexdigest()

    who = sim.run(
        "world",
        ["ssh", *_ssh_options(key), "-p", "2222", f"root@{PARENT_ETH0}", "echo $SSH_CLIENT"],
    )
    assert who.stdout.split()[0] == "198.18.0.2", "sshd must see the world client's real address"
