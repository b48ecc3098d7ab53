"""``make bench-smoke`` as a test: the benchmark runs end to end against its real servers, fetchpool
answers every request with the right body (an alternative's failed requests are findings the
report shows; no client may get wrong bytes), and the report is produced (table on stdout, JSON,
markdown, PNG). It asserts no timing and no goal: those are for ``make bench`` to report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMOKE_CLIENTS = {"fp-many", "fp-stream", "httpx", "httpx2", "aiohttp", "unpooled", "wrk"}
#: The clients of the 500-in-flight cell (lat500-h2): fetchpool and the two in-process scripts.
WIDE_CLIENTS = {"fp-many", "fp-stream", "httpx", "aiohttp"}
FETCHPOOL = {"fp-many", "fp-stream"}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_smoke_completes_every_request_and_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=840, check=False,
    )
    assert proc.returncode == 0, f"bench --smoke exited {proc.returncode}\n{proc.stderr[-4000:]}"

    data = json.loads((out / "latest.json").read_text())
    results = data["results"]
    cells = data["meta"]["args"]["cells"].split(",")
    if os.geteuid() != 0:  # the latency cells need a network namespace
        cells = [c for c in cells if not c.startswith("lat-")]
    assert any(c.startswith("lat-") for c in cells) or os.geteuid() != 0
    assert any(c.startswith("lat500-") for c in cells) or os.geteuid() != 0
    transports = data["meta"]["transports"]
    assert transports and data["meta"]["default_transport"] in transports
    seen = {(r["cell"], r["client_key"]) for r in results}
    for cell in cells:
        for client in WIDE_CLIENTS if cell.startswith("lat500-") else SMOKE_CLIENTS:
            if client == "wrk" and "proxy" in cell:
                continue
            keys = [f"{client}@{t}" for t in transports] if client.startswith("fp-") else [client]
            for key in keys:
                assert (cell, key) in seen, f"no run of {key} on {cell}"
    wide = [r for r in results if r["cell"].startswith("lat500-")]
    assert all(r["c"] == data["meta"]["wide_c"] for r in wide if r["client_key"] != "wrk"), wide

    for r in results:
        where = f"{r['cell']} {r['client_key']}: {r.get('first_error') or r.get('stderr_tail')}"
        assert r["bad"] == 0, where  # no client got other bytes than the page's
        if r["client_key"] == "wrk":
            assert r["rc"] == 0 and r["errors"] == 0 and r["ok"] > 0, where
        elif r["client_key"].partition("@")[0] in FETCHPOOL:
            assert r["rc"] == 0 and r["errors"] == 0 and r["ok"] == r["n"] > 0, where
        else:
            # An alternative's failed requests are a finding the report shows, as bench/cli.py
            # says (pooled httpx hits h2's LocalProtocolError after a GOAWAY now and then, seen
            # here through squid); its run must still end and account for every request.
            assert r["rc"] in (0, 3) and r["ok"] + r["errors"] == r["n"] > 0 and r["ok"] > 0, where

    assert set(data["memory"]) == set(data["resize"]) == set(transports)
    for memory in data["memory"].values():
        assert memory["ok"] == memory["n"] > 0 and not memory["errors"] and not memory["bad"]
        assert memory["samples"], "no RSS samples"
    for resize in data["resize"].values():
        assert resize["failed"] == 0 and resize["ok"] == resize["n"] > 0
    assert data["goals"], "no goals table"
    goals = {g["goal"] for g in data["goals"]}
    assert any("vs in-process pooled httpx" in g for g in goals) and any("vs the httpcore transport" in g
                                                                         for g in goals), goals

    markdown = (out / "latest.md").read_text()
    for heading in ("## Key ratios", "## Goals", "## Per scenario", "cores"):
        assert heading in markdown
        assert heading in proc.stdout
    assert (out / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(300)
def test_the_telemetry_overhead_bench_runs_every_mode_and_exports_every_span() -> None:
    n, rounds = 150, 2
    proc = subprocess.run(
        [sys.executable, "bench/telemetry_overhead.py", "-n", str(n), "-c", "16", "--rounds", str(rounds), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=280, check=False,
    )
    assert proc.returncode == 0, f"telemetry_overhead.py exited {proc.returncode}\n{proc.stderr[-4000:]}"
    report = json.loads(proc.stdout)
    modes = report["modes"]
    assert set(modes) == {"off", "metrics", "client", "full", "spans"}
    for entry in modes.values():
        assert len(entry["all_fetches_per_s"]) == rounds and entry["fetches_per_s"] > 0
        assert "paired_loss_pct" in entry and "cpu_s_per_1000" in entry
    # Every fetch of the traced modes reached the OTLP receiver, warm-up included: a CLIENT span
    # each (client, full), plus 4 to 6 phase spans each (spans), plus one SERVER span per call.
    fetches = 200 + n * rounds
    assert report["spans_received"] >= 2 * fetches + 5 * fetches
