"""The README's quickstart, `consent-ledger up --demo --exit-after-demo`, run as a user runs it."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def _port_held(port: int) -> Iterator[None]:
    """`port` on loopback taken for the duration (by this test, or already by something else)."""
    with socket.socket() as holder:
        with contextlib.suppress(OSError):  # already taken: held all the same
            holder.bind(("127.0.0.1", port))
            holder.listen()
        yield


@pytest.mark.slow
def test_up_runs_the_demo_keeping_a_configured_token_and_making_the_missing_ones(tmp_path: Path) -> None:
    # Only the auditor role configured: `up` used to stop with StopIteration while printing the other roles' tokens.
    env = {key: value for key, value in os.environ.items() if not key.startswith("CONSENT_LEDGER_")}
    env |= {"CONSENT_LEDGER_DATA_DIR": str(tmp_path), "CONSENT_LEDGER_AUDITOR_TOKENS": "given-auditor-token"}
    # No port asked for and the services' default one taken: `up` used to fail to bind the API to 8080.
    with _port_held(8080):
        done = subprocess.run(
            [sys.executable, "-m", "consent_ledger", "up", "--demo", "--exit-after-demo"],
            env=env, capture_output=True, text=True, timeout=300, check=False,
        )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "127.0.0.1:8080" not in out
    assert "token (auditor): given-auditor-token  (from CONSENT_LEDGER_AUDITOR_TOKENS)" in out
    made = dict(re.findall(r"token \((pipeline|admin)\): (\S+)  \(made for this run\)", out))
    assert set(made) == {"pipeline", "admin"}
    assert made["pipeline"] != made["admin"]
    # The late opt-out: eligible as known before it arrived, not eligible as known after.
    frank = re.findall(r"frank +f-chat-1 +at 2025-10-10: (eligible|not eligible) +\((\w+);.*watermark (\d+)\)", out)
    assert len(frank) == 2, out
    (before, reason_before, seen_before), (after, reason_after, seen_after) = frank
    assert (before, reason_before) == ("eligible", "consent")
    assert (after, reason_after) == ("not eligible", "opted_out")
    assert int(seen_after) == int(seen_before) + 1
    # The in-memory broker's run leaves no state behind in the data directory.
    assert list(tmp_path.iterdir()) == []
