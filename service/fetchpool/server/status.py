"""Whole-call errors as ``google.rpc.Status`` with details a program can act on (Google AIP-193).

Every error carries an ``ErrorInfo`` whose ``reason`` is stable (the table below; domain
``fetchpool.io``) with the numbers it is about in ``metadata``; ``INVALID_ARGUMENT`` adds a
``BadRequest`` naming each bad field; an error a retry can cure adds ``RetryInfo`` (draining:
another replica answers at once). The details travel in the ``grpc-status-details-bin`` trailer
(``grpc_status.rpc_status.from_call`` in Python, ``status.FromError(err).Details()`` in Go,
``@grpc/grpc-js``'s ``error.metadata``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple, NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = ["DOMAIN", "REASONS", "abort", "status_of"]

DOMAIN = "fetchpool.io"


class Reason(NamedTuple):
    code: grpc.StatusCode
    #: Seconds after which the same call may succeed (RetryInfo); None: retrying it cannot help.
    retry_after: float | None = None


#: Every ErrorInfo reason fetchpool sends, its status code and its retry delay.
REASONS: Mapping[str, Reason] = {
    # A batch with no request.
    "EMPTY_BATCH": Reason(grpc.StatusCode.INVALID_ARGUMENT),
    # A batch over --max-batch-size: split it (the same batch is refused again, so no RetryInfo).
    "BATCH_TOO_LARGE": Reason(grpc.StatusCode.RESOURCE_EXHAUSTED),
    # The replica is shutting down: call another one.
    "DRAINING": Reason(grpc.StatusCode.UNAVAILABLE, retry_after=1.0),
    # SetPoolLimits with limits that are invalid or inconsistent.
    "INVALID_LIMITS": Reason(grpc.StatusCode.INVALID_ARGUMENT),
    # SetPoolLimits naming a pool this replica does not have.
    "POOL_NOT_FOUND": Reason(grpc.StatusCode.NOT_FOUND),
    # No bearer token, or a wrong one (--auth-token-file).
    "BAD_TOKEN": Reason(grpc.StatusCode.UNAUTHENTICATED),
    # A state-changing admin method (SetPoolLimits) without the admin token (--admin-token-file).
    "BAD_ADMIN_TOKEN": Reason(grpc.StatusCode.UNAUTHENTICATED),
    # The same, called with a valid fetch token: that caller may fetch, not change the fleet.
    "ADMIN_TOKEN_REQUIRED": Reason(grpc.StatusCode.PERMISSION_DENIED),
}


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def status_of(
    reason: str,
    message: str,
    *,
    metadata: Mapping[str, object] | None = None,
    violations: Iterable[tuple[str, str]] = (),
) -> grpc.Status:
    """The grpc.Status (code, message, details trailer) of ``reason`` (a key of REASONS);
    ``violations`` are (field, description) pairs for a BadRequest."""
    code, retry_after = REASONS[reason]
    details = [_pack(error_details_pb2.ErrorInfo(
        reason=reason, domain=DOMAIN, metadata={k: str(v) for k, v in (metadata or {}).items()}))]
    violations = list(violations)
    if violations:
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=text) for field, text in violations
        ])))
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(round(retry_after * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=details))


async def abort(
    context: grpc.aio.ServicerContext,
    reason: str,
    message: str,
    *,
    metadata: Mapping[str, object] | None = None,
    violations: Iterable[tuple[str, str]] = (),
) -> NoReturn:
    """End the call with the status of :func:`status_of` (raises, as ``context.abort`` does)."""
    status = status_of(reason, message, metadata=metadata, violations=violations)
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises
