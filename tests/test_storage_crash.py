"""kill -9 of a real writer process during writes: reopen finds no corruption and every
acknowledged synced write."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from agentnode.storage.episodic import EpisodicStore

WRITER = """
import sys
from agentnode.storage.episodic import EpisodicStore, NewRecord
store = EpisodicStore(sys.argv[1])
i = 0
while True:
    if i % 3 == 0:  # a batch, not synced
        store.append_many("a", "ns", "t", [NewRecord({"i": i, "n": n}) for n in range(10)])
    else:
        rid = store.append("a", "ns", "t", {"i": i, "pad": "x" * 500}, sync=True)
        print(rid, flush=True)  # acknowledged only after the synced write returned
    i += 1
"""


def test_kill9_during_writes_keeps_every_acknowledged_synced_write(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path / "db")], stdout=subprocess.PIPE, text=True
    )
    acked: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 0.5
        while len(acked) < 50 or time.monotonic() < deadline:
            acked.append(proc.stdout.readline().strip())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    with EpisodicStore(tmp_path / "db") as store:
        for rid in acked:
            assert store.get("a", "ns", "t", rid).value["pad"] == "x" * 500
        records = store.scan("a", "ns", "t", limit=100_000, newest_first=False)
        assert len(records) >= len(acked)
        # Every batch is all-or-nothing.
        batches: dict[int, int] = {}
        for r in records:
            if "n" in r.value:
                batches[r.value["i"]] = batches.get(r.value["i"], 0) + 1
        assert set(batches.values()) <= {10}
        store.append("a", "ns", "t", "writable after the crash", sync=True)
