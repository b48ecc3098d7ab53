"""A real ``fetchpool serve`` process on a loopback port, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .process import ServerProcess, ServerStartError, free_port


class FetchpoolService(ServerProcess):
    """``python -m fetchpool serve --listen 127.0.0.1:PORT *args`` with ``env`` added to the environment.

    ``start`` returns once the health service answers SERVING (not just once the port listens).
    ``ca_pem`` makes the service trust the tests' CA (``--ca-bundle``); ``credentials`` are
    the channel credentials of the readiness check when the service serves TLS.
    """

    name = "fetchpool"

    def __init__(
        self,
        *args: str,
        ca_pem: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        workdir: Path | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        super().__init__(workdir)
        self.credentials = credentials  # for the readiness check of a TLS service
        self.port = port or free_port()
        # Test servers live on loopback, which the SSRF guard refuses unless allowed.
        allow = [] if any(a.startswith(("--allow-targets", "--ssrf-guard")) for a in args) else [
            "--allow-targets", "127.0.0.0/8,::1/128"]
        self.args = [*args, *allow, *(["--ca-bundle", str(ca_pem)] if ca_pem else [])]
        self.env = dict(env or {})

    @property
    def target(self) -> str:
        """``host:port`` for a gRPC channel."""
        return f"127.0.0.1:{self.port}"

    def ports(self) -> Sequence[int]:
        return (self.port,)

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "fetchpool", "serve", "--listen", self.target, *self.args]

    def start(self, timeout: float = 20.0) -> FetchpoolService:
        # The base class reads os.environ at Popen time; pass ours through it.
        saved = dict(os.environ)
        os.environ.update(self.env)
        try:
            super().start(timeout)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        deadline = time.monotonic() + timeout
        secure = self.credentials is not None
        channel = grpc.secure_channel(self.target, self.credentials) if secure else grpc.insecure_channel(self.target)
        with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return self
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline or not self.running:
                    self.stop()
                    raise ServerStartError(self._describe_failure("never reported SERVING"))
                time.sleep(0.05)

    def output(self) -> str:
        """Everything the process printed so far."""
        return self.output_path.read_text(errors="replace")

    def terminate(self) -> None:
        """Send SIGTERM (start a drain) without waiting."""
        self._signal_group(signal.SIGTERM)

    def interrupt(self) -> None:
        """Send SIGINT (Ctrl-C) without waiting."""
        self._signal_group(signal.SIGINT)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit; returns its exit status."""
        assert self._proc is not None
        return self._proc.wait(timeout)
