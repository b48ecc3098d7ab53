"""gRPC callers fetchpool did not write, the way other teams call it.

- :class:`ReflectedClient`: grpcio with default channel options (4 MiB messages, no keepalive
  unless given), whose message classes come from the server's reflection service: no
  fetchpool stub, no ``fetchpool.client``. Large results are joined here as a caller would.
- :func:`run_node`: ``tests/node/client.js``, @grpc/grpc-js + @grpc/proto-loader from npm
  (``npm ci`` from the committed lock, see :func:`install_node_clients`).
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import itertools
import json
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc_tools
from google.protobuf import descriptor_pool, message_factory
from google.rpc import status_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

NODE_DIR = Path(__file__).resolve().parents[1] / "node"
#: Where proto-loader finds google/rpc/*.proto and the well-known types.
PROTO_PATH = [str(Path(status_pb2.__file__).parents[2]), str(Path(grpc_tools.__file__).parent / "_proto")]


def install_node_clients() -> None:
    """``npm ci`` in tests/node when node_modules does not match package-lock.json (stamped by its hash).

    Raises RuntimeError with npm's output when it fails.
    """
    lock = (NODE_DIR / "package-lock.json").read_bytes()
    stamp = NODE_DIR / "node_modules" / ".fetchpool-lock-sha256"
    digest = hashlib.sha256(lock).hexdigest()
    # Test files run in parallel workers (pytest-xdist): one npm ci at a time, the others wait
    # for it and find the stamp (two at once fail with ENOTEMPTY removing each other's files).
    with (NODE_DIR / ".npm-ci.lock").open("w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        if stamp.is_file() and stamp.read_text() == digest:
            return
        done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True,
                              text=True, timeout=300, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"npm ci in {NODE_DIR} failed:\n{done.stdout}\n{done.stderr}")
        stamp.write_text(digest)


async def run_node(job: dict[str, Any], timeout: float = 120) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run tests/node/client.js on ``job``; returns (the whole results, the final status line)."""
    process = await asyncio.create_subprocess_exec(
        "node", str(NODE_DIR / "client.js"), json.dumps({"proto_path": PROTO_PATH, **job}),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    lines = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    assert lines and lines[-1].get("done"), f"node client ended without a status:\n{out.decode()}\n{err.decode()}"
    return lines[:-1], lines[-1]


class ReflectedClient:
    """A plain grpcio channel (``options`` only as given: default 4 MiB receive limit) and message
    classes built from the server's reflection. Use as a context manager."""

    def __init__(self, target: str, options: Sequence[tuple[str, Any]] = ()) -> None:
        self.channel = grpc.insecure_channel(target, options=list(options))
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(self.channel))
        self.messages = {
            name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"fetchpool.v1.{name}"))
            for name in ("FetchRequest", "FetchRequests", "FetchManyRequest", "FetchResult", "FetchResults")
        }

    def __enter__(self) -> ReflectedClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.channel.close()

    def request(self, **fields: Any) -> Any:
        return self.messages["FetchRequest"](**fields)

    def _method(self, name: str, kind: str, request_type: str, response_type: str = "FetchResult") -> Any:
        return getattr(self.channel, kind)(
            f"/fetchpool.v1.FetchService/{name}",
            request_serializer=self.messages[request_type].SerializeToString,
            response_deserializer=self.messages[response_type].FromString,
        )

    def fetch(self, timeout: float | None = None, **fields: Any) -> Any:
        return self._method("Fetch", "unary_unary", "FetchRequest")(self.request(**fields), timeout=timeout)

    def fetch_many(self, requests: Iterable[Any], timeout: float | None = None, **fields: Any) -> Iterator[Any]:
        """Raw messages of a FetchMany call (parts not joined: see :func:`whole`)."""
        message = self.messages["FetchManyRequest"](requests=list(requests), **fields)
        return self._method("FetchMany", "unary_stream", "FetchManyRequest")(message, timeout=timeout)

    def fetch_stream(self, requests: Iterator[Any], timeout: float | None = None) -> Any:
        return self._method("FetchStream", "stream_stream", "FetchRequest")(requests, timeout=timeout)

    def fetch_many_packed(self, requests: Iterable[Any], timeout: float | None = None, **fields: Any) -> Any:
        """The FetchResults messages of a FetchManyPacked call (see :func:`unpacked`)."""
        message = self.messages["FetchManyRequest"](requests=list(requests), **fields)
        return self._method("FetchManyPacked", "unary_stream", "FetchManyRequest", "FetchResults")(
            message, timeout=timeout)

    def fetch_stream_packed(self, requests: Iterator[Any], per_message: int = 3, timeout: float | None = None) -> Any:
        """The FetchResults messages of a FetchStreamPacked call sending ``per_message`` requests a message."""
        pending = iter(requests)
        messages = (self.messages["FetchRequests"](requests=batch)
                    for batch in iter(lambda: list(itertools.islice(pending, per_message)), []))
        return self._method("FetchStreamPacked", "stream_stream", "FetchRequests", "FetchResults")(
            messages, timeout=timeout)


def unpacked(messages: Iterable[Any]) -> Iterator[Any]:
    """The results of FetchResults messages, in order (parts not joined: see :func:`whole`)."""
    for message in messages:
        yield from message.results


def whole(messages: Iterable[Any]) -> Iterator[tuple[Any, int]]:
    """(result with its body and text joined, number of parts) for each result of a message stream,
    as a caller joins them (README: parts of one result are consecutive, part 0 first)."""
    head, bodies, texts = None, [], []
    for message in messages:
        if message.part == 0:
            head, bodies, texts = message, [], []
        assert head is not None and message.index == head.index and message.part == len(bodies), message
        bodies.append(message.body)
        texts.append(message.text)
        if not message.more_parts:
            head.body, head.text = b"".join(bodies), "".join(texts)
            yield head, len(bodies)


def details(error: grpc.RpcError) -> dict[str, Any]:
    """The google.rpc.Status details of a failed call, by type name (ErrorInfo, RetryInfo, BadRequest)."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    found: dict[str, Any] = {}
    for any_detail in status.details if status is not None else ():
        for name in ("ErrorInfo", "RetryInfo", "BadRequest"):
            detail = getattr(error_details_pb2, name)()
            if any_detail.Is(detail.DESCRIPTOR):
                any_detail.Unpack(detail)
                found[name] = detail
    return found
