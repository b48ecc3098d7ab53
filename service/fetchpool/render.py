"""How the CLI shows messages: JSON for programs, a readable view for people at a terminal.

JSON (:func:`to_json`): every field of the message, under its proto name, numbers as numbers
(also 64-bit ones, which the proto3 JSON mapping writes as strings), enums as names, durations as
seconds, timestamps as RFC 3339, unset messages as null. The terminal view (:func:`result_view`)
is httpie's: a status line, the headers, a blank line and the body as text; :func:`stats_table`
shows pool stats with one column per pool.
"""

from __future__ import annotations

import base64
import http
import ipaddress
import re
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from fetchpool import charset
from fetchpool.addresses import is_global, judged_as
from fetchpool.v1 import fetch_pb2 as pb

__all__ = ["HINTS", "HINTS_BY_MESSAGE", "call_error", "forbidden_hint", "hint", "result_view", "stats_table", "to_json",
           "verbose_lines"]

#: What to do about a failed fetch, by error kind (shown after the error at a terminal).
HINTS = {
    "FORBIDDEN_TARGET": "the service refuses loopback, private and link-local targets (SSRF guard); to fetch one, "
                        "start the service with --allow-targets CIDR,... (e.g. FETCHPOOL_ALLOW_TARGETS="
                        "127.0.0.0/8,::1/128 make run)",
    "DNS": "check the host name; the service resolves it, from where it runs",
    "CONNECT": "nothing accepted the connection at that address and port: is the target up?",
    "TIMEOUT": "give it more time: --timeout SECONDS for each fetch, --deadline SECONDS for the whole call",
    "POOL_TIMEOUT": "the pool was full for too long: lower --concurrency, or raise the service's --max-connections",
    # The CLI asks for no body limit of its own, so the service's --max-body-bytes is the limit.
    "TOO_LARGE": "the body is larger than the service accepts: restart the service with a larger "
                 "--max-body-bytes (FETCHPOOL_MAX_BODY_BYTES)",
    "TOO_MANY_REDIRECTS": "the target redirects in a loop, or more often than the service follows "
                          "(--max-redirects); -v lists the redirects followed",
    "PROTOCOL": "the target's answer is not valid HTTP (a garbled response, a connection closed early, or "
                "something else than HTTP on that port): check the URL's scheme and port",
    "INVALID_ARGUMENT": "the request was refused before it was sent: check --method, the -H headers and --timeout "
                        "(at most the service's --max-request-timeout)",
    "TLS": "the TLS handshake with the target failed (no TLS version or cipher in common, or the target "
           "refused the handshake): check the URL's scheme and port",
    "NETWORK": "the connection was reset or closed during the exchange, by the target or something between; "
               "a GET or other idempotent request was sent again as far as the retry policy allows (-v says "
               "why each send was repeated)",
    "PROXY": "the forward proxy failed: check the service's --proxy",
    "PROXY_AUTH": "the forward proxy refused the credentials in the service's --proxy URL",
    "UNAVAILABLE": "the service is shutting down: send the item again",
    "INVALID_URL": "give an absolute http:// or https:// URL",
}


#: Kinds said of several causes: the hint follows what the message names (the first key found,
#: in lower case; otherwise HINTS[kind]). TOO_LARGE is said of a body, a header block and a whole
#: result message; CONNECT of a refused connection and of a handshake cut short; INVALID_URL of
#: a URL given and of a redirect's; TLS of a target that answers in plain text (OpenSSL reads its
#: first bytes as a TLS record of a wrong version or length: Python's ssl and libcurl quote
#: OpenSSL), of a certificate and of a handshake.
HINTS_BY_MESSAGE = {
    "TOO_LARGE": (
        ("parser's limit", "the header block is larger than the HTTP client reads at all (100 KiB): no setting "
                           "raises that"),
        ("for libcurl", "the header block is larger than libcurl reads at all (100 KiB): no setting raises that"),
        ("header", "the response headers exceed the service's limits: start it with a larger --max-header-bytes "
                   "or --max-header-count"),
        ("one message", "the result exceeds the largest message the service sends: raise its --max-message-bytes"),
    ),
    "CONNECT": (("tls handshake", "the target accepted the connection, then closed it during the TLS handshake: "
                                  "does it speak TLS on that port (is it http://?)"),),
    "INVALID_URL": (("redirect to", "the target redirected to an address fetchpool cannot fetch (not an "
                                    "http(s) URL with a host): its Location header says where"),),
    "TLS": tuple((key, "the target does not speak TLS on that port (is it http://?)") for key in (
        "wrong version number", "wrong_version_number", "record layer failure", "record_layer_failure",
        "packet length too long")) + tuple(
        (key, "the target's certificate is not trusted by the service (its --ca-bundle)") for key in (
            "certificate verify failed", "ssl certificate", "certificate subject name")),
}


def hint(kind: str, message: str) -> str:
    """What to do about a failed fetch of ``kind`` (a FetchError.Kind name) that says ``message``;
    "" when there is nothing to add."""
    if kind == "FORBIDDEN_TARGET":
        return forbidden_hint(message)
    lowered = message.lower()
    return next((text for key, text in HINTS_BY_MESSAGE.get(kind, ()) if key in lowered), HINTS.get(kind, ""))


#: The address in a FORBIDDEN_TARGET message (fetchpool.engine.guard.refusal).
_REFUSED = re.compile(r"\S+ resolves to (?P<resolved>\S+), which is not allowed"
                      r"|(?P<literal>\S+) is not an allowed address")
#: The link-local ranges, where clouds serve instance metadata (169.254.169.254): never an invitation.
_LINK_LOCAL = (ipaddress.IPv4Network("169.254.0.0/16"), ipaddress.IPv6Network("fe80::/10"))


def forbidden_hint(message: str) -> str:
    """The hint of a FORBIDDEN_TARGET ``message``: for the address it names, the rule that lets
    the service fetch it, except for the link-local range of cloud metadata, and the deny list for
    a public address (the built-in rule refuses none)."""
    found = _REFUSED.fullmatch(message)
    try:
        given = ipaddress.ip_address((found["resolved"] or found["literal"]).split("%", 1)[0]) if found else None
    except ValueError:  # not an address after all
        given = None
    if given is None:
        return HINTS["FORBIDDEN_TARGET"]
    address = judged_as(given)
    if network := next((net for net in _LINK_LOCAL if net.version == address.version and address in net), None):
        return (f"{address} is in {network}, the link-local range, where clouds serve instance metadata: "
                "the service refuses it on purpose (SSRF guard)")
    if is_global(given):
        return f"{address} is refused by the service's --deny-targets"
    # The CLI does not know the service's rules: the hint adds to them, never replaces them.
    return ("the service refuses loopback, private and link-local targets (SSRF guard); to fetch this one, add "
            f"{address}/{address.max_prefixlen} to the service's --allow-targets (FETCHPOOL_ALLOW_TARGETS), "
            "keeping the entries it already has")


#: What gRPC core says when the peer answered, but not in HTTP/2 (an HTTP/1 server, ...).
_NOT_GRPC = ("Failed parsing HTTP/2", "Trying to connect an http1.x server")


def call_error(command: str, exc: grpc.aio.AioRpcError, target: str, *, token_file: str | None = None,
               connected: bool = True, waited: float | None = None) -> str:
    """What went wrong with a call of ``fetchpool COMMAND`` to ``target``, and what to do about it.
    ``token_file``: the --token-file sent; ``connected``: whether the channel got a gRPC
    connection (a deadline passed before it did: something accepted the connection but never
    answered as gRPC); ``waited``: the call's deadline, seconds."""
    code, text = exc.code(), exc.details() or ""
    trailers: Any = exc.trailing_metadata() or ()  # (key, value) pairs; the stubs say otherwise
    status = next((status_pb2.Status.FromString(value) for key, value in trailers
                   if key == "grpc-status-details-bin"), None)
    reason, retry = "", None
    for detail in status.details if status is not None else ():
        info, delay = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            reason = info.reason
        elif detail.Unpack(delay):
            retry = delay.retry_delay.ToTimedelta().total_seconds()
    prefix = f"fetchpool {command}: "
    if code == grpc.StatusCode.UNAVAILABLE and not reason and "errors resolving" in text:
        return (f"{prefix}the host of --target {target} does not resolve ({text}); give the "
                "service's address with --target HOST:PORT")
    if code == grpc.StatusCode.UNAVAILABLE and not reason and any(key in text for key in _NOT_GRPC):
        return (f"{prefix}something answered at {target}, but not gRPC ({text}): is that fetchpool's port? "
                "Give the service's address with --target HOST:PORT")
    if code == grpc.StatusCode.UNAVAILABLE and not reason:
        return (f"{prefix}cannot reach the service at {target} ({text}). Is it running? Start it with "
                "`fetchpool serve` (or `make run`), or give its address with --target HOST:PORT")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and not connected:
        within = f" within {waited:g} s" if waited is not None else ""
        return (f"{prefix}something at {target} accepted the connection but did not answer as gRPC{within}: "
                "is that fetchpool's port? Give the service's address with --target HOST:PORT")
    hint = {
        grpc.StatusCode.DEADLINE_EXCEEDED: "; give the call more time with --deadline SECONDS",
        grpc.StatusCode.UNAUTHENTICATED: (f"; the token in {token_file} was refused: it must be one of the "
                                          "service's tokens (its --auth-token-file)") if token_file
                                         else "; pass the service's token with --token-file FILE",
    }.get(code, f"; retry in {retry:g} s" if retry is not None else "")
    return f"{prefix}{code.name}{f' ({reason})' if reason else ''}: {text}{hint}"


def _value(field: Any, value: Any) -> Any:
    message_type = field.message_type
    if message_type is None:
        if field.enum_type is not None:
            return field.enum_type.values_by_number[value].name if value in field.enum_type.values_by_number else value
        return base64.b64encode(value).decode("ascii") if isinstance(value, bytes) else value
    if message_type.full_name == "google.protobuf.Duration":
        return value.seconds + value.nanos / 1e9
    if message_type.full_name == "google.protobuf.Timestamp":
        return value.ToJsonString()
    return to_json(value)


def to_json(message: Message) -> dict[str, Any]:
    """Every field of ``message`` as JSON values (see the module's docstring)."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {key: _value(value_field, item) for key, item in value.items()}
        elif field.is_repeated:
            out[field.name] = [_value(field, item) for item in value]
        elif field.message_type is not None and not message.HasField(field.name):
            out[field.name] = None
        else:
            out[field.name] = _value(field, value)
    return out


def result_json(result: pb.FetchResult, body: str) -> dict[str, Any]:
    """A result as JSON. ``body``: ``base64`` (proto3 JSON: ``body`` base64, ``text`` as sent),
    ``text`` (the same, and ``text`` holds the body decoded per ``encoding``, or null when the
    body is not text: ``encoding`` empty) or ``omit`` (``body`` null)."""
    data = to_json(result)
    if body == "text":
        data["text"] = text_of(result) if result.text or result.encoding else None
    elif body == "omit":
        data["body"] = None
    return data


def text_of(result: pb.FetchResult) -> str:
    """The body as text: the server's ``text`` if it sent one, else decoded per ``encoding``
    (as UTF-8, with replacements, when the body is not text)."""
    if result.text:
        return result.text
    return charset.decode(result.body, result.encoding or "utf-8")


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


def _header(result: pb.FetchResult, name: str) -> str:
    return next((h.value for h in result.headers if h.name.lower() == name), "")


def result_view(result: pb.FetchResult, *, body: str = "text") -> str:
    """The terminal view of one result: status line, headers, blank line, then the body as
    ``body`` says: ``text`` (a note instead for a body that is not text), ``base64`` (in lines of
    76 characters, as base64(1) writes them: ``base64 -d`` reads them back) or ``omit``. A failed
    fetch shows its error and what to do, after the status line and headers when it has them (a
    302 that ended in TOO_MANY_REDIRECTS, a 200 whose body was TOO_LARGE), and no body."""
    head = ""
    if result.status_code:
        lines = [f"{result.http_version or 'HTTP'} {result.status_code} {_reason(result.status_code)}".rstrip()]
        lines += [f"{h.name}: {h.value}" for h in result.headers]
        head = "\n".join(lines) + "\n"
    if result.HasField("error"):
        kind = pb.FetchError.Kind.Name(result.error.kind)
        lines = [f"{kind}: {result.error.message}"]
        if advice := hint(kind, result.error.message):
            lines.append(f"  hint: {advice}")
        return (head + "\n" if head else "") + "\n".join(lines) + "\n"
    if body == "omit" or not result.body:
        return head
    if body == "base64":
        return head + "\n" + base64.encodebytes(result.body).decode("ascii")
    if not result.encoding:
        kind = _header(result, "content-type") or "unknown type"
        return head + f"\n[binary body: {result.body_size} bytes of {kind}; save it with -o FILE]\n"
    text = text_of(result)
    return head + "\n" + text + ("" if text.endswith("\n") else "\n")


def verbose_lines(result: pb.FetchResult) -> list[str]:
    """curl -v's "*" lines: where the response came from, redirects, timings, attempts."""
    t = result.timings
    lines = [f"* {result.url}" + (f" -> {result.final_url}" if result.final_url and result.final_url != result.url
                                  else "")]
    lines += [f"* redirect {r.status_code} from {r.url}" for r in result.redirects]
    last = result.redirects[-1] if result.redirects else None
    answered_by = result.final_url or result.url
    followed = last is not None and (last.url, last.status_code) == (answered_by, result.status_code)
    if 300 <= result.status_code < 400 and (location := _header(result, "location")) and not followed:
        # The last answer redirects too: a loop, the --max-redirects-th redirect, one to no URL,
        # or not followed. (One followed whose next hop failed is listed above; the error says why.)
        lines.append(f"* redirect {result.status_code} from {answered_by} to {location}, not followed")
    peer = f"peer {result.remote_address}" if result.remote_address else "no answer"
    https = (result.final_url or result.url).startswith("https:")
    # No version over https: no handshake completed, or the transport does not report it (curl).
    tls = result.tls_version or ("TLS version unknown" if https and result.http_version else
                                 "no TLS session" if https else "no TLS")
    lines.append(f"* {peer} via pool {result.pool or '?'}, {result.http_version or '-'}, {tls}, "
                 f"connection {'reused' if result.connection_reused else 'new'}")
    lines.append(f"* {result.attempts} attempt(s); pool wait {t.pool_wait_seconds:.3f} s, connect "
                 f"{t.connect_seconds:.3f} s, proxy {t.proxy_connect_seconds:.3f} s, TLS {t.tls_seconds:.3f} s, "
                 f"first byte {t.ttfb_seconds:.3f} s, total {t.total_seconds:.3f} s")
    lines += [f"* sent again after: {reason}" for reason in result.retry_reasons]
    lines.append(f"* body {result.body_size} bytes" + (", decoded from its Content-Encoding"
                                                        if result.content_decoded else "")
                 + (f", encoding {result.encoding}" if result.encoding else ""))
    return lines


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def stats_table(pools: Sequence[pb.PoolStats]) -> str:
    """Pool stats as a table: one row per field (limits.* flattened), one column per pool."""
    columns = [_flat(to_json(pool)) for pool in pools]
    if not columns:
        return "no pools\n"
    names = list(columns[0])
    width = max(len(name) for name in names)
    cells = [[_cell(column[name]) for column in columns] for name in names]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    rows = [f"{name:<{width}}  " + "  ".join(f"{cell:>{w}}" for cell, w in zip(row, widths, strict=True))
            for name, row in zip(names, cells, strict=True)]
    return "\n".join(rows) + "\n"
