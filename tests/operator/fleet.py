"""Helpers of the operator's end-to-end test: real service processes as "pods", the emulated API.

There is no real Kubernetes API server on these machines. The API is ``kmock``'s
``KubernetesEmulator`` (by the kopf author): a stateful emulator over real HTTP on loopback with
watch streams; it does not version objects (no resourceVersion), treats every patch as a merge
patch, ignores label selectors on lists, and runs no controllers - so the test plays the HPA
controller, the Deployment controller and the kubelet itself, by patching objects over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from fetchpool.v1 import fetch_pb2, fetch_pb2_grpc

NS = "default"
FETCHPOOL = "fetchpool.io/v1alpha1/fetchpools"
CONFIGMAP = "v1/configmaps"
GRPC_PORT_ANNOTATION = "fetchpool.io/grpc-port"
KUBELET_FINALIZER = "e2e.fetchpool.io/kubelet"
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_kubeconfig(path: Path, server: str) -> Path:
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "kmock",
                "clusters": [{"name": "kmock", "cluster": {"server": server}}],
                "users": [{"name": "e2e", "user": {"token": "e2e-token"}}],
                "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "e2e", "namespace": NS}}],
            }
        )
    )
    return path


async def limits_of(address: str, timeout: float = 0.5) -> dict[str, int] | None:
    """Pool -> max_connections in force, from the pod's own GetPoolStats; None when it does not answer."""
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stats = await fetch_pb2_grpc.PoolAdminStub(channel).GetPoolStats(
                fetch_pb2.GetPoolStatsRequest(), timeout=timeout
            )
    except grpc.aio.AioRpcError:
        return None
    return {p.pool: p.limits.max_connections for p in stats.pools}


@dataclass
class ServicePod:
    """One ``fetchpool serve`` process on loopback standing in for a pod."""

    name: str
    port: int
    log: Path
    process: asyncio.subprocess.Process | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, limits_file: Path, env: Mapping[str, str] | None = None) -> None:
        """Start like a container whose ConfigMap volume holds ``limits_file`` (and with ``env``,
        e.g. the chart's ``FETCHPOOL_MAX_CONNECTIONS`` and admin token); returns when serving."""
        env = {**os.environ, "FETCHPOOL_LIMITS_FILE": str(limits_file), **(env or {})}
        self.process = await asyncio.create_subprocess_exec(
            str(VENV_BIN / "fetchpool"),
            "serve",
            "--listen",
            self.address,
            "--grace-period",
            "0.5",
            stdout=self.log.open("ab"),
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + 20
        while await limits_of(self.address, timeout=0.3) is None:
            if self.process.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pod {self.name} did not start: {self.log.read_text()[-2000:]}")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), 5)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


def pod_object(name: str, *, port: int | None = None, ready: bool = False) -> dict[str, Any]:
    """A Pod of the ``web`` Deployment; ``ready`` gives it loopback as its IP and a Ready condition."""
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NS,
            "uid": f"uid-{name}",
            "labels": {"app": "web"},
            "annotations": {GRPC_PORT_ANNOTATION: str(port)} if port else {},
            "finalizers": [KUBELET_FINALIZER],
        },
        "spec": {"containers": [{"name": "fetchpool"}]},
        "status": {"phase": "Pending"},
    }
    if ready:
        pod["status"] = ready_status()
    return pod


def ready_status() -> dict[str, Any]:
    return {
        "phase": "Running",
        "podIP": "127.0.0.1",
        "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}],
    }


@dataclass
class Sample:
    at: float
    limits: dict[str, int]  # pod name -> max_connections of its "direct" pool

    @property
    def total(self) -> int:
        return sum(self.limits.values())


@dataclass
class Sampler:
    """Reads every running pod's limits in force every ``interval`` seconds (from GetPoolStats)."""

    pods: Mapping[str, ServicePod]
    interval: float = 0.1
    samples: list[Sample] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            running = [pod for pod in self.pods.values() if pod.running]
            answers = await asyncio.gather(*(limits_of(pod.address, timeout=0.5) for pod in running))
            self.samples.append(
                Sample(
                    at=started,
                    limits={
                        pod.name: sum(found.values()) for pod, found in zip(running, answers, strict=True) if found
                    },
                )
            )
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def between(self, start: float, end: float) -> list[Sample]:
        return [s for s in self.samples if start <= s.at < end]


async def wait_until(predicate: Any, *, timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll an async predicate; returns the seconds it took, or fails naming ``what``."""
    started = time.monotonic()
    while True:
        if await predicate():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(interval)
