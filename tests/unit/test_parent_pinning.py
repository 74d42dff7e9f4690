"""Following the named enclave: nitro-cli output, the pinning decision, exit on its end."""

from __future__ import annotations

import pytest

from nitro_netd.parent.enclave_watch import (
    EnclaveInfo,
    EnclaveWatcher,
    NitroCliError,
    PinVerdict,
    decide_pin,
    find_running,
    parse_describe,
)

DESCRIBE = """[
  {"EnclaveName": "app", "EnclaveID": "i-1-enc-2", "ProcessID": 4321, "EnclaveCID": 16,
   "NumberOfCPUs": 2, "CPUIDs": [1, 3], "MemoryMiB": 512, "State": "RUNNING", "Flags": "NONE"},
  {"EnclaveName": "other", "EnclaveCID": 17, "State": "RUNNING"},
  {"EnclaveName": "old", "EnclaveCID": 18, "State": "TERMINATING"}
]"""


@pytest.mark.parametrize(
    ("following", "enclave_cid", "peer_cid", "verdict"),
    [
        (True, 16, 16, PinVerdict.ACCEPT),
        (True, 16, 17, PinVerdict.REFUSE),
        (True, None, 16, PinVerdict.REFUSE),
        (False, None, 17, PinVerdict.UNPINNED),
        (True, 16, None, PinVerdict.NOT_VSOCK),
        (False, None, None, PinVerdict.NOT_VSOCK),
    ],
)
def test_decide_pin(
    following: bool, enclave_cid: int | None, peer_cid: int | None, verdict: PinVerdict
) -> None:
    assert decide_pin(following=following, enclave_cid=enclave_cid, peer_cid=peer_cid) is verdict


def test_parse_describe_reads_real_nitro_cli_output() -> None:
    enclaves = parse_describe(DESCRIBE)
    assert enclaves[0] == EnclaveInfo("app", 16, "RUNNING")
    assert find_running(enclaves, "app") == EnclaveInfo("app", 16, "RUNNING")
    assert find_running(enclaves, "old") is None
    assert find_running(enclaves, "missing") is None
    assert parse_describe("[]") == []


@pytest.mark.parametrize("text", ["", "{}", "[1]", '[{"EnclaveName": "a"}]', "not json"])
def test_parse_describe_rejects_garbage(text: str) -> None:
    with pytest.raises(NitroCliError):
        parse_describe(text)


def test_watcher_calls_on_gone_once_after_the_enclave_was_seen() -> None:
    gone: list[bool] = []
    watcher = EnclaveWatcher("app", "/bin/true", on_gone=lambda: gone.append(True))
    watcher.update(None)
    assert gone == [], "never seen yet: the daemon may start before the enclave"
    watcher.update(EnclaveInfo("app", 16, "RUNNING"))
    assert watcher.cid == 16
    watcher.update(EnclaveInfo("app", 20, "RUNNING"))  # restarted with a new CID
    assert (watcher.cid, gone) == (20, [])
    watcher.update(None)
    watcher.update(None)
    assert gone == [True]
    assert watcher.cid is None
