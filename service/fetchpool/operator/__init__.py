"""The fetchpool operator: per-replica pool limits that follow the scaler within a fleet connection budget.

``fetchpool operator`` (or ``python -m fetchpool.operator``) runs :func:`main`: a kopf operator that
watches ``FetchPool`` resources (``fetchpool.io/v1alpha1``), the Deployment they target, whatever
scales it (an HPA, KEDA's HPA, or nobody: then the Deployment's replicas, so ``kubectl scale``
re-divides too) and its pods. A pod starts with ``minPerReplica`` connections per pool from the
ConfigMap ``<name>-limits`` (key ``limits.json``, read with ``--limits-file`` /
``FETCHPOOL_LIMITS_FILE``); the operator keeps that much for every pod the scaler may still add and
raises the ready pods to their share of the rest once it has confirmed what every pod holds. So the
fleet stays within the budget at every moment, also while no operator runs (the rule and its limits:
:mod:`~fetchpool.operator.budget`). It divides connections (sockets: each CONNECT tunnel is one
connection to the proxy), not requests: over HTTP/2 a connection carries many requests, which each
pod caps on its own (``max_requests``, by default 100 per connection it holds).

Modules: :mod:`~fetchpool.operator.budget` (the ledger, pure), :mod:`~fetchpool.operator.policy`
(per-replica sizing, pure), :mod:`~fetchpool.operator.resource` (the CR's shape),
:mod:`~fetchpool.operator.status` (status and conditions), :mod:`~fetchpool.operator.reconciler`
(one round), :mod:`~fetchpool.operator.handlers` (kopf), :mod:`~fetchpool.operator.k8s` (API I/O),
:mod:`~fetchpool.operator.delivery` (gRPC to the pods), :mod:`~fetchpool.operator.peering` (is this
peer in charge), :mod:`~fetchpool.operator.health` (liveness and metrics). It never imports the
server or the engine.

Scaling signal - avoid the feedback loop
    Do not let the HPA (or KEDA) scale on *pool utilization* (in use / per-replica limit): the
    operator shrinks the per-replica limit as replicas grow, so that ratio stays put after a
    scale-out and the HPA keeps adding replicas up to ``maxReplicas``. Scale on CPU, or on the
    absolute per-pod demand the service exports, ``fetchpool_demand_requests`` (requests in flight
    plus queued, a gauge per pod): an HPA ``type: Pods`` metric with ``target.averageValue``, or a
    KEDA Prometheus trigger on ``sum(fetchpool_demand_requests)`` with ``metricType: AverageValue``.
    More replicas lower the demand per pod, which is what closes the loop.

Single active operator
    Run one replica with ``strategy: Recreate``, and/or kopf peering (``--peering NAME`` with the
    ``KopfPeering``/``ClusterKopfPeering`` CRDs shipped in the chart's ``crds/``): only the peer
    with the highest ``--priority`` acts, the others pause - their resync loop and retries too
    (:mod:`~fetchpool.operator.peering`). ``--standalone`` disables peering.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
import uuid
from collections.abc import Sequence

__all__ = ["build_parser", "main"]

log = logging.getLogger(__name__)


def build_parser(prog: str = "fetchpool operator") -> argparse.ArgumentParser:
    """The command-line interface of :func:`main`."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Keep fetchpool pods' pool limits within a fleet connection budget as the HPA scales.",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        metavar="NS",
        help="serve this namespace (repeatable; globs allowed, e.g. 'team-*')",
    )
    scope.add_argument(
        "-A",
        "--all-namespaces",
        action="store_true",
        help="serve the whole cluster (the default when no --namespace is given)",
    )
    peering = parser.add_mutually_exclusive_group()
    peering.add_argument(
        "--standalone",
        action="store_true",
        help="no peering: act even if other operators run (use with strategy: Recreate)",
    )
    peering.add_argument(
        "--peering",
        metavar="NAME",
        default=None,
        help="kopf peering object name; only the highest --priority peer acts",
    )
    parser.add_argument("--priority", type=int, default=0, help="peering priority (default 0)")
    parser.add_argument(
        "--liveness",
        metavar="URL",
        default=os.environ.get("FETCHPOOL_OPERATOR_LIVENESS"),
        help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz (env FETCHPOOL_OPERATOR_LIVENESS)",
    )
    parser.add_argument(
        "--metrics",
        metavar="URL",
        default=os.environ.get("FETCHPOOL_OPERATOR_METRICS"),
        help="Prometheus endpoint, e.g. http://0.0.0.0:9090/metrics (env FETCHPOOL_OPERATOR_METRICS)",
    )
    parser.add_argument(
        "--resync-interval",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="safety-net reconciliation of every FetchPool (default 30)",
    )
    parser.add_argument(
        "--delivery-timeout",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="deadline of the gRPC exchange with one pod (default 2)",
    )
    parser.add_argument(
        "--retry-interval",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="retry pods that did not take the limits after this long (default 2)",
    )
    parser.add_argument(
        "--watch-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="end and re-open every watch after this long (default 60)",
    )
    parser.add_argument(
        "--max-silence",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="liveness fails after this long without any watch event (default 600)",
    )
    env = os.environ.get
    tls = parser.add_argument_group("calls to the pods (PoolAdmin)")
    tls.add_argument(
        "--tls-ca",
        metavar="PEM",
        default=env("FETCHPOOL_OPERATOR_TLS_CA"),
        help="CA of the pods' certificates; enables TLS (env FETCHPOOL_OPERATOR_TLS_CA)",
    )
    tls.add_argument(
        "--tls-server-name",
        metavar="NAME",
        default=env("FETCHPOOL_OPERATOR_TLS_SERVER_NAME"),
        help="name in the pods' certificates (env FETCHPOOL_OPERATOR_TLS_SERVER_NAME)",
    )
    tls.add_argument(
        "--tls-cert",
        metavar="PEM",
        default=env("FETCHPOOL_OPERATOR_TLS_CERT"),
        help="client certificate for mTLS (env FETCHPOOL_OPERATOR_TLS_CERT)",
    )
    tls.add_argument(
        "--tls-key",
        metavar="PEM",
        default=env("FETCHPOOL_OPERATOR_TLS_KEY"),
        help="client key for mTLS (env FETCHPOOL_OPERATOR_TLS_KEY)",
    )
    tls.add_argument(
        "--admin-token-file",
        metavar="PATH",
        default=env("FETCHPOOL_ADMIN_TOKEN_FILE"),
        help="the pods' admin bearer token (their --admin-token-file; its first line is sent), "
        "re-read for every round (env FETCHPOOL_ADMIN_TOKEN_FILE)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    parser.add_argument("--debug", action="store_true", help="log everything")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the operator until SIGINT/SIGTERM; returns the process exit code."""
    import kopf

    from fetchpool.operator.delivery import ChannelSecurity, Delivery
    from fetchpool.operator.handlers import HandlerSettings, register
    from fetchpool.operator.health import Health
    from fetchpool.operator.k8s import KubeIO, load_api_client
    from fetchpool.operator.peering import PeeringGate
    from fetchpool.operator.reconciler import Reconciler

    args = build_parser().parse_args(list(argv) if argv is not None else None)
    for name, value in (
        ("--resync-interval", args.resync_interval),
        ("--delivery-timeout", args.delivery_timeout),
        ("--retry-interval", args.retry_interval),
        ("--watch-timeout", args.watch_timeout),
    ):
        if not value > 0:
            print(f"fetchpool operator: {name} must be > 0, got {value}", file=sys.stderr)
            return 2
    security = ChannelSecurity(
        ca_file=args.tls_ca or None,
        server_name=args.tls_server_name or None,
        cert_file=args.tls_cert or None,
        key_file=args.tls_key or None,
        token_file=args.admin_token_file or None,
    )
    for problem in security.problems():
        print(f"fetchpool operator: {problem}", file=sys.stderr)
    if security.problems():
        return 2
    try:
        api_client = load_api_client()
    except Exception as exc:  # no in-cluster account and no usable kubeconfig
        print(f"fetchpool operator: cannot configure the Kubernetes client: {exc}; run it in a pod with a "
              "service account (the chart's operator.enabled), or point KUBECONFIG at a kubeconfig file",
              file=sys.stderr)
        return 2

    level = os.environ.get("FETCHPOOL_LOG_LEVEL", "").upper()  # the chart sets it for every component
    kopf.configure(verbose=args.verbose or level == "INFO", debug=args.debug or level == "DEBUG")
    health = Health(max_silence_seconds=args.max_silence)
    clusterwide = args.all_namespaces or not args.namespace
    kube = KubeIO(api_client)
    identity = os.environ.get("POD_ID") or f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:6]}"
    gate = None
    if args.peering and not args.standalone:
        name = args.peering
        gate = PeeringGate(
            lambda namespace: kube.get_peering(namespace, name),
            identity=identity,
            priority=args.priority,
            clusterwide=clusterwide,
        )
    reconciler = Reconciler(
        kube,
        Delivery(timeout=args.delivery_timeout, security=security),
        health,
        retry_seconds=args.retry_interval,
        active=gate,
    )
    registry = kopf.OperatorRegistry()
    register(
        registry,
        reconciler,
        HandlerSettings(
            resync_seconds=args.resync_interval,
            watch_server_timeout=args.watch_timeout,
            watch_client_timeout=args.watch_timeout + 30.0,
            metrics_endpoint=args.metrics,
        ),
    )
    try:
        asyncio.run(
            kopf.operator(
                registry=registry,
                identity=identity,  # type: ignore[arg-type]  # kopf's NewType of str; the gate uses the same
                standalone=args.standalone or None,
                peering_name=args.peering,
                priority=args.priority,
                liveness_endpoint=args.liveness,
                clusterwide=clusterwide,
                namespaces=[] if clusterwide else args.namespace,
            )
        )
    except KeyboardInterrupt:
        return 130
    finally:
        api_client.close()
    return 0
