"""A real Prometheus server (Debian's ``prometheus``) on a loopback port, with its own config and
storage in its workdir, scraping the given targets every second::

    with Prometheus([ScrapeJob("fetchpool", f"127.0.0.1:{port}", {"namespace": "prod"})]) as prom:
        prom.wait_for(lambda: prom.query("up") ...)
        prom.query('sum(rate(http_client_request_duration_seconds_count[10s]))')

Exemplar storage is on (``--enable-feature=exemplar-storage``), so the OpenMetrics exemplars of a
target are queryable with :meth:`Prometheus.query_exemplars`.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .process import ServerProcess, ServerStartError, find_binary, free_port

T = TypeVar("T")


@dataclass(frozen=True)
class ScrapeJob:
    """One scrape job of one target; ``labels`` are target labels (what service discovery and
    relabelling would add); ``honor_labels`` keeps the target's own labels on conflicts."""

    name: str
    target: str
    labels: Mapping[str, str] = field(default_factory=dict)
    honor_labels: bool = False


class Prometheus(ServerProcess):
    """Prometheus scraping ``jobs`` every ``interval`` and evaluating ``rule_files`` as often."""

    name = "prometheus"

    def __init__(
        self,
        jobs: Sequence[ScrapeJob],
        *,
        rule_files: Sequence[Path] = (),
        interval: str = "1s",
        port: int | None = None,
        workdir: Path | None = None,
    ) -> None:
        super().__init__(workdir)
        self.jobs = list(jobs)
        self.rule_files = list(rule_files)
        self.interval = interval
        self.port = port or free_port()
        self.config_path = self.workdir / "prometheus.yml"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ports(self) -> Sequence[int]:
        return (self.port,)

    def _command(self) -> list[str]:
        return [
            find_binary("prometheus"),
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--enable-feature=exemplar-storage",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ]

    def _write_config(self) -> None:
        config = {
            "global": {"scrape_interval": self.interval, "evaluation_interval": self.interval},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {
                    "job_name": job.name,
                    "honor_labels": job.honor_labels,
                    "static_configs": [{"targets": [job.target], "labels": dict(job.labels)}],
                }
                for job in self.jobs
            ],
        }
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def start(self, timeout: float = 30.0) -> Prometheus:
        super().start(timeout)
        deadline = time.monotonic() + timeout
        while True:  # listening is not ready: it still replays its (empty) write-ahead log
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as reply:
                    if reply.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline or not self.running:
                self.stop()
                raise ServerStartError(self._describe_failure("never became ready"))
            time.sleep(0.1)

    # --- HTTP API ----------------------------------------------------------------------------------
    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/<path>; the ``data`` of a success, AssertionError with Prometheus' error otherwise."""
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as reply:
                body = json.load(reply)
        except urllib.error.HTTPError as exc:
            body = json.load(exc)
        assert body.get("status") == "success", f"{path} {params}: {body.get('errorType')}: {body.get('error')}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector (or scalar as one sample) of ``expr`` now."""
        data = self.api("query", query=expr)
        if data["resultType"] == "vector":
            return data["result"]
        return [{"metric": {}, "value": data["result"]}]

    def label_values(self, label: str, match: str) -> list[str]:
        """Values of ``label`` on the series ``match`` selects (Grafana's ``label_values()``)."""
        return self.api(f"label/{label}/values", **{"match[]": match})

    def query_exemplars(self, expr: str, seconds: float = 600) -> list[dict[str, Any]]:
        """The exemplars of the series of ``expr`` over the last ``seconds``."""
        now = time.time()
        return self.api("query_exemplars", query=expr, start=now - seconds, end=now)

    def targets(self) -> list[dict[str, Any]]:
        return self.api("targets")["activeTargets"]

    def rule_groups(self) -> list[dict[str, Any]]:
        return self.api("rules")["groups"]

    @staticmethod
    def wait_for(probe: Callable[[], T | None], timeout: float = 30.0, what: str = "condition") -> T:
        """Call ``probe`` until it returns something truthy (returned), for at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = probe()
            except AssertionError:
                result = None
                if time.monotonic() > deadline:
                    raise
            if result:
                return result
            assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
            time.sleep(0.25)
