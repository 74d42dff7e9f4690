"""Following the named enclave: nitro-cli output, the pinning decision, exit on its end."""

from __future__ import annotations

import logging

import pytest

from nitro_netd.parent.enclave_watch import (
    FAILURE_WARNING_INTERVAL,
    WORKED_FOR,
    EnclaveInfo,
    EnclaveWatcher,
    NitroCliError,
    PinVerdict,
    decide_pin,
    find_running,
    parse_describe,
    summarize_stderr,
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


NITRO_CLI_STDERR = """Failed connections: 1
[ E39 ] Enclave process connection failure. Such error appears when the enclave manager \
fails to connect to at least one enclave process for retrieving the description information.

For more details, please visit https://docs.aws.amazon.com/enclaves/latest/user/cli-errors.html#E39

If you open a support ticket, please provide the error log found at \
"/var/log/nitro_enclaves/err2021-06-18T21:46:43.249656960+00:00.log"
"""


def test_a_failed_nitro_cli_run_is_summed_up_by_its_error_code_line() -> None:
    assert summarize_stderr(NITRO_CLI_STDERR) == (
        "[ E39 ] Enclave process connection failure. Such error appears when the enclave"
        " manager fails to connect to at least one enclave process for retrieving the"
        " description information."
    )
    assert summarize_stderr("first\nsegfault\n\n") == "segfault"
    assert summarize_stderr("") == "no output"


def watcher_on_a_fake_clock(
    caplog: pytest.LogCaptureFixture,
) -> tuple[EnclaveWatcher, list[float]]:
    """A watcher of enclave "app" whose clock reads `now[0]` (the test moves it), its log
    captured."""
    now = [1000.0]
    caplog.set_level(logging.INFO, logger="nitro_netd.parent.enclave_watch")
    return EnclaveWatcher("app", "/bin/false", clock=lambda: now[0]), now


def test_a_failing_nitro_cli_is_warned_about_when_it_starts_then_every_10_minutes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    watcher, now = watcher_on_a_fake_clock(caplog)
    for poll in range(200):  # polled every 3 s: 10 minutes
        watcher.failed(f"nitro-cli exited 1: [ E39 ] failure {poll}")
        now[0] += FAILURE_WARNING_INTERVAL / 200
    watcher.failed("nitro-cli exited 1: [ E39 ] failure 200")
    assert watcher.error == "nitro-cli exited 1: [ E39 ] failure 200"
    assert caplog.messages == [
        "enclave app: nitro-cli exited 1: [ E39 ] failure 0",
        "enclave app: nitro-cli exited 1: [ E39 ] failure 200"
        " (199 more failed polls since the last warning)",
    ]
    caplog.clear()
    watcher.update(EnclaveInfo("app", 16, "RUNNING"))
    assert watcher.error is None
    now[0] += WORKED_FOR
    watcher.failed("nitro-cli exited 1: [ E11 ] again")  # failing anew: warned at once
    assert [r.levelno for r in caplog.records] == [logging.INFO, logging.INFO, logging.WARNING]
    assert caplog.messages[0] == "enclave app: nitro-cli works again"
    assert caplog.messages[-1] == "enclave app: nitro-cli exited 1: [ E11 ] again"


def test_a_nitro_cli_failing_and_working_by_turns_is_warned_about_once_per_10_minutes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    watcher, now = watcher_on_a_fake_clock(caplog)
    for _ in range(100):  # every other poll fails: 10 minutes
        watcher.failed("nitro-cli exited 1: [ E39 ] busy")
        now[0] += 3
        watcher.update(EnclaveInfo("app", 16, "RUNNING"))
        now[0] += 3
    assert [m for m in caplog.messages if "nitro-cli" in m] == [
        "enclave app: nitro-cli exited 1: [ E39 ] busy",
        "enclave app: nitro-cli works again",
    ]
    watcher.failed("nitro-cli exited 1: [ E39 ] busy")  # 10 minutes on: warned again
    assert caplog.messages[-1] == (
        "enclave app: nitro-cli exited 1: [ E39 ] busy (99 more failed polls since the last warning)"
    )
