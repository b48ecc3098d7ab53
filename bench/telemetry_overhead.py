"""Throughput of ``fetchpool serve`` with telemetry off vs on, in the same run.

Starts nginx (TLS + HTTP/2, the test fixtures' config), an OTLP/gRPC receiver on loopback
(tests/support/otlp_receiver.py) and one ``fetchpool serve`` per mode:

- ``off``: no ``OTEL_*`` variable (telemetry not set up; one ``is None`` test per fetch);
- ``metrics``: OTLP metrics only (``OTEL_TRACES_EXPORTER=none``);
- ``client``: ``full`` with ``FETCHPOOL_TRACE_PHASES=none`` (one CLIENT span per fetch, no phases);
- ``full``: the defaults with an OTLP endpoint: traces sampled at 100 % (the default sampler, no
  caller context, so every call is a sampled root), phases as span events, plus metrics;
- ``spans``: ``full`` with ``FETCHPOOL_TRACE_PHASES=spans`` (every phase a child span).

Each round drives every mode in turn with the same FetchMany batches (distinct URLs, ``-c`` in
flight), starting from a different mode each round, so drift on the machine hits all modes alike.
Reports fetches/s and the service's CPU seconds per 1000 fetches (user+system, all its threads,
the exporter threads included) per mode, as the median over rounds, the loss against ``off``, and
the paired loss: the median over rounds of each round's loss against that round's ``off`` (the
steadiest figure when the machine's speed drifts). The goal: ``full`` loses at most 10 %.

    .venv/bin/python bench/telemetry_overhead.py -n 3000 -c 64 --rounds 5 [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "service")]

import grpc  # noqa: E402
from fetchpool.v1 import fetch_pb2 as pb  # noqa: E402
from fetchpool.v1 import fetch_pb2_grpc as pb_grpc  # noqa: E402
from support import Certs, Nginx, write_site  # noqa: E402
from support.fetchpool_service import FetchpoolService  # noqa: E402
from support.otlp_receiver import OtlpReceiver  # noqa: E402

MODES = ("off", "metrics", "client", "full", "spans")
_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _env(mode: str, receiver: OtlpReceiver) -> dict[str, str]:
    if mode == "off":
        return {}
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.grpc_endpoint, "OTEL_SERVICE_NAME": f"bench-{mode}",
           "OTEL_METRIC_EXPORT_INTERVAL": "5000"}
    if mode == "metrics":
        env["OTEL_TRACES_EXPORTER"] = "none"
    if mode in ("spans", "client"):
        env["FETCHPOOL_TRACE_PHASES"] = "spans" if mode == "spans" else "none"
    return env


def _batch(stub: pb_grpc.FetchServiceStub, urls: list[str], concurrency: int) -> int:
    request = pb.FetchManyRequest(requests=[pb.FetchRequest(url=u, id=str(i)) for i, u in enumerate(urls)],
                                  concurrency=concurrency)
    ok = 0
    for result in stub.FetchMany(request, timeout=600):
        ok += result.status_code == 200 and not result.HasField("error")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=3000, help="fetches per mode per round")
    parser.add_argument("-c", type=int, default=256, help="fetches in flight (FetchMany concurrency)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--page", default="small.html", help="page of the test site (small.html 2 KiB, large.html)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, among {', '.join(MODES)}")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    with tempfile.TemporaryDirectory(prefix="fetchpool-bench-") as tmp:
        work = Path(tmp)
        certs = Certs(work / "certs")
        (work / "site").mkdir()
        write_site(work / "site")
        with Nginx(work / "site", certs, workdir=work / "nginx") as nginx, OtlpReceiver() as receiver:
            services = {m: FetchpoolService(ca_pem=certs.ca_pem, env=_env(m, receiver), workdir=work / m).start()
                        for m in modes}
            try:
                channels = {m: grpc.insecure_channel(s.target) for m, s in services.items()}
                stubs = {m: pb_grpc.FetchServiceStub(c) for m, c in channels.items()}
                base = f"{nginx.https_url}/{args.page}"
                for mode in modes:  # warm up: connections, imports, JIT-less caches
                    _batch(stubs[mode], [f"{base}?warm={mode}-{i}" for i in range(200)], args.c)
                rates: dict[str, list[float]] = {m: [] for m in modes}
                cpu: dict[str, list[float]] = {m: [] for m in modes}
                for round_ in range(args.rounds):
                    shift = round_ % len(modes)  # each mode takes each place in the order in turn
                    for mode in modes[shift:] + modes[:shift]:
                        urls = [f"{base}?r={round_}&m={mode}&i={i}" for i in range(args.n)]
                        cpu_before = _cpu_seconds(services[mode].pid)
                        started = time.perf_counter()
                        ok = _batch(stubs[mode], urls, args.c)
                        elapsed = time.perf_counter() - started
                        if ok != args.n:
                            print(f"{mode}: only {ok} of {args.n} fetches ok", file=sys.stderr)
                            return 1
                        rates[mode].append(args.n / elapsed)
                        cpu[mode].append((_cpu_seconds(services[mode].pid) - cpu_before) / args.n * 1000)
                for channel in channels.values():
                    channel.close()
            finally:
                for service in services.values():
                    service.stop(timeout=15)
            spans = len(receiver.spans)
    report = {
        "fetches_per_mode_per_round": args.n, "concurrency": args.c, "rounds": args.rounds, "page": args.page,
        "spans_received": spans,
        "modes": {m: {"fetches_per_s": round(statistics.median(rates[m]), 1),
                      "best_fetches_per_s": round(max(rates[m]), 1),
                      "cpu_s_per_1000": round(statistics.median(cpu[m]), 3),
                      "best_cpu_s_per_1000": round(min(cpu[m]), 3),
                      "all_fetches_per_s": [round(r, 1) for r in rates[m]]} for m in modes},
    }
    if "off" in modes:
        off = report["modes"]["off"]
        for m in modes:
            entry = report["modes"][m]
            entry["throughput_loss_pct"] = round(100 * (1 - entry["fetches_per_s"] / off["fetches_per_s"]), 1)
            # Paired: each round's loss against that round's off run, the median over rounds.
            entry["paired_loss_pct"] = round(100 * statistics.median(
                1 - r / o for r, o in zip(rates[m], rates["off"], strict=True)), 1)
            entry["cpu_increase_pct"] = round(100 * (entry["cpu_s_per_1000"] / off["cpu_s_per_1000"] - 1), 1)
            # Best round against best round: what other load on the machine disturbs least.
            entry["best_throughput_loss_pct"] = round(
                100 * (1 - entry["best_fetches_per_s"] / off["best_fetches_per_s"]), 1)
            entry["best_cpu_increase_pct"] = round(
                100 * (entry["best_cpu_s_per_1000"] / off["best_cpu_s_per_1000"] - 1), 1)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{args.n} fetches x {args.rounds} rounds per mode, {args.c} in flight, https {args.page}; "
          f"{spans} spans received")
    print("median of rounds | paired: median over rounds of the loss against that round's off | best round")
    print(f"{'mode':<8} {'fetches/s':>10} {'loss':>7} {'CPU s/1000':>11} {'CPU +':>7} | {'paired':>7} | "
          f"{'fetches/s':>10} {'loss':>7} {'CPU s/1000':>11} {'CPU +':>7}")
    for m in modes:
        e = report["modes"][m]
        print(f"{m:<8} {e['fetches_per_s']:>10.1f} {e.get('throughput_loss_pct', 0):>6.1f}% "
              f"{e['cpu_s_per_1000']:>11.3f} {e.get('cpu_increase_pct', 0):>6.1f}% | "
              f"{e.get('paired_loss_pct', 0):>6.1f}% | "
              f"{e['best_fetches_per_s']:>10.1f} {e.get('best_throughput_loss_pct', 0):>6.1f}% "
              f"{e['best_cpu_s_per_1000']:>11.3f} {e.get('best_cpu_increase_pct', 0):>6.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
