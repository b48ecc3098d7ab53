"""The pods of a fetchpool Deployment as the operator sees them: live, ready, their admin address,
and the label selectors that find them. Plain functions of the API's JSON dicts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fetchpool.operator.resource import ANNOTATION_GRPC_PORT, DEFAULT_GRPC_PORT

__all__ = ["PodView", "label_selector_string", "pod_address", "pod_is_live", "pod_is_ready", "pod_view",
           "selector_matches"]


def pod_is_live(pod: Mapping[str, Any]) -> bool:
    """Not yet terminated: pending, running or terminating (it may still hold connections)."""
    phase = (pod.get("status") or {}).get("phase")
    return phase not in ("Succeeded", "Failed")


def pod_is_ready(pod: Mapping[str, Any]) -> bool:
    """Has an IP and its ``Ready`` condition is ``True`` (it serves, so it can take new limits)."""
    status = pod.get("status") or {}
    if not status.get("podIP") or not pod_is_live(pod):
        return False
    for cond in status.get("conditions") or []:
        if isinstance(cond, Mapping) and cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def pod_address(pod: Mapping[str, Any], default_port: int = DEFAULT_GRPC_PORT) -> str | None:
    """``host:port`` of the pod's ``PoolAdmin`` service (see the module docstring), or ``None``."""
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None
    port: int | None = None
    annotation = ((pod.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_GRPC_PORT)
    if annotation is not None:
        try:
            port = int(annotation)
        except (TypeError, ValueError):
            port = None
    if port is None:
        for container in (pod.get("spec") or {}).get("containers") or []:
            for cport in container.get("ports") or []:
                if cport.get("name") == "grpc" and isinstance(cport.get("containerPort"), int):
                    port = cport["containerPort"]
                    break
            if port is not None:
                break
    port = port or default_port
    host = f"[{ip}]" if ":" in str(ip) else str(ip)
    return f"{host}:{port}"


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str] | None) -> bool:
    """Whether ``labels`` satisfy a ``LabelSelector`` (``matchLabels`` and ``matchExpressions``).

    An empty or missing selector matches nothing (a Deployment always has one; matching every pod
    of the namespace by accident would divide the budget by the wrong count).
    """
    if not selector:
        return False
    labels = labels or {}
    match_labels = selector.get("matchLabels") or {}
    expressions = selector.get("matchExpressions") or []
    if not match_labels and not expressions:
        return False
    if any(labels.get(k) != v for k, v in match_labels.items()):
        return False
    for expr in expressions:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def label_selector_string(selector: Mapping[str, Any] | None) -> str:
    """The ``labelSelector`` query string for a ``LabelSelector`` (server-side filtering)."""
    if not selector:
        return ""
    parts = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In":
            parts.append(f"{key} in ({','.join(values)})")
        elif op == "NotIn":
            parts.append(f"{key} notin ({','.join(values)})")
        elif op == "Exists":
            parts.append(str(key))
        elif op == "DoesNotExist":
            parts.append(f"!{key}")
    return ",".join(parts)


@dataclass(frozen=True, kw_only=True, slots=True)
class PodView:
    """What the operator needs of one pod (``started``: past phase ``Pending``, its process may have
    read the limits file and taken limits since)."""

    name: str
    uid: str
    address: str | None
    live: bool
    ready: bool
    terminating: bool
    started: bool = True
    restarts: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)


def pod_view(pod: Mapping[str, Any], default_port: int) -> PodView:
    """Summarize a Pod dict."""
    meta = pod.get("metadata") or {}
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return PodView(
        name=str(meta.get("name", "")),
        uid=str(meta.get("uid") or meta.get("name", "")),
        address=pod_address(pod, default_port),
        live=pod_is_live(pod),
        ready=pod_is_ready(pod),
        terminating=bool(meta.get("deletionTimestamp")),
        started=(pod.get("status") or {}).get("phase", "Pending") != "Pending",
        restarts=sum(int(s.get("restartCount") or 0) for s in statuses if isinstance(s, Mapping)),
        labels=dict(meta.get("labels") or {}),
    )
