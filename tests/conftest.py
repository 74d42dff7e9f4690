"""Every test tier: forbid AF_VSOCK for the suite and every process it starts.

A development or CI machine's vsock device belongs to the machine's host: a test that went
wrong (an agent started with its default `vsock://3:1024`) must fail at once, never talk to
it. The variable is inherited by the daemons, agents and simulators the tests start.
"""

from __future__ import annotations

import os

from nitro_netd.transport.endpoint import NO_VSOCK_ENV

os.environ[NO_VSOCK_ENV] = "1"
