"""kopf handlers: small, idempotent, level-triggered - each one only says *which* FetchPool to reconcile.

What triggers a round (:meth:`fetchpool.operator.reconciler.Reconciler.trigger`):

- HPA events (``@kopf.on.event`` on ``autoscaling/v2`` ``horizontalpodautoscalers``). kopf's
  ``on.update`` handlers ignore status-only changes, and ``status.currentReplicas`` /
  ``status.desiredReplicas`` are status, so the operator uses raw *event* handlers, which fire on
  every watch event, status included. They also store nothing on the HPA (no kopf annotations on
  objects the operator does not own).
- Deployment events (``spec.replicas`` moves before the HPA's status does: the HPA controller scales
  first and records its status afterwards) and Pod events of the target's pods (pods created,
  becoming ready, terminating, gone).
- FetchPool events whose spec differs from the last one seen (creation, spec changes, and every
  FetchPool once at start-up); status-only changes, including the operator's own, are ignored.
- A resync loop every ``resync_seconds`` over every known FetchPool: the safety net for a missed
  event; it also re-reads every ready pod (``full``), correcting limits changed behind the
  operator's back. (Not ``@kopf.timer``, which would put a finalizer on every FetchPool.)
- The reconciler's own schedules: retrying pods not at their limit, and applying a deferred change
  when its stabilization window ends.
- The deletion of a FetchPool: the others of its namespace on the same Deployment (one of them may
  have been refused with ``Conflict`` and now divides the budget).

While kopf peering has paused this operator (a peer with a higher priority runs), kopf delivers no
events; the resync loop and the reconciler's schedules ask :mod:`fetchpool.operator.peering` and skip
their rounds too, so a paused operator writes nothing.

The operator writes nothing to a FetchPool but its status: no kopf finalizers or annotations.

Routing uses two kopf in-memory indexes, filled from the watches: FetchPools by namespace (with
their target Deployment / HPA) and Deployment selectors (to recognise the target's pods).

Health (see :mod:`fetchpool.operator.health`): every watch event is counted; ``@kopf.on.probe``
feeds kopf's liveness endpoint; watch timeouts are set at start-up so that a silent or stuck watch
is closed and re-opened (``server_timeout`` asks the API server to end each watch, ``client_timeout``
ends it from our side, and kopf's ``inactivity_timeout`` reconnects a stream that went quiet).
kopf itself re-lists when a watch answers ``410 Gone`` (``kopf/_cogs/clients/watching.py``,
``continuous_watch``: on an ``ERROR`` event with code 410 it returns to a fresh list + watch).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import kopf

from fetchpool.operator import pods, resource
from fetchpool.operator.health import Health, serve_metrics
from fetchpool.operator.reconciler import Reconciler

__all__ = ["HandlerSettings", "register"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class HandlerSettings:
    """Operator timing and endpoints (seconds unless stated).

    - ``resync_seconds``: the safety-net round of every FetchPool.
    - ``watch_server_timeout``: each watch request asks the server to end it after this long.
    - ``watch_client_timeout``: and is cut from our side after this long (> server timeout).
    - ``watch_inactivity_timeout``: a watch with no event (bookmarks included) for this long is
      considered dead and re-opened.
    - ``request_timeout``: every other API request.
    - ``metrics_endpoint``: ``http://host:port/path`` for Prometheus, or ``None``.
    - ``login``: register kopf's standard login (in-cluster or kubeconfig); tests log in themselves.
    """

    resync_seconds: float = 30.0
    watch_server_timeout: float = 60.0
    watch_client_timeout: float = 90.0
    watch_inactivity_timeout: float = 70.0
    request_timeout: float = 30.0
    metrics_endpoint: str | None = None
    login: bool = True


def _pools_in(index: Any, namespace: str | None) -> Iterable[tuple[str, str, str | None]]:
    """(FetchPool name, Deployment, HPA name or None) of the FetchPools in ``namespace``."""
    if namespace is None:
        return ()
    store = index.get(namespace) if index is not None else None
    return list(store) if store is not None else ()


def _first(store: Any) -> Any:
    for value in store or ():
        return value
    return None


def register(registry: kopf.OperatorRegistry, reconciler: Reconciler, config: HandlerSettings) -> None:
    """Register every handler of the operator on ``registry``."""
    health: Health = reconciler.health
    group, version, plural = resource.GROUP, resource.VERSION, resource.PLURAL
    tasks: list[asyncio.Task[None]] = []

    # --- lifecycle ------------------------------------------------------------------------------

    @kopf.on.startup(id="configure", registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.watching.server_timeout = config.watch_server_timeout
        settings.watching.client_timeout = config.watch_client_timeout
        settings.watching.connect_timeout = 10.0
        settings.watching.inactivity_timeout = config.watch_inactivity_timeout
        settings.networking.request_timeout = config.request_timeout
        # No handler here needs kopf's bookkeeping; should one ever, keep it in annotations.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=resource.GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=resource.GROUP, key="last-handled-configuration"
        )
        settings.posting.level = logging.WARNING
        tasks.append(asyncio.create_task(resync_forever(), name="fetchpool-resync"))
        if config.metrics_endpoint:
            ready = asyncio.Event()
            tasks.append(asyncio.create_task(serve_metrics(health, config.metrics_endpoint, ready=ready)))
            await asyncio.wait_for(ready.wait(), 10)

    @kopf.on.cleanup(id="cleanup", registry=registry)
    async def cleanup(**_: Any) -> None:
        await reconciler.close()
        for task in tasks:
            task.cancel()

    if config.login:

        @kopf.on.login(id="login", registry=registry)
        def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
            return kopf.login_via_client(**kwargs)

    @kopf.on.probe(id="seconds_since_last_event", registry=registry)
    def probe_events(**_: Any) -> float:
        return health.probe()

    # --- indexes --------------------------------------------------------------------------------

    @kopf.index(group, version, plural, id="fetchpools_by_namespace", registry=registry)
    def fetchpools_by_namespace(
        name: str, namespace: str | None, spec: Mapping[str, Any], **_: Any
    ) -> dict[str, tuple[str, str, str | None]]:
        target = spec.get("target") or {}
        return {namespace or "": (name, str(target.get("name") or ""), target.get("hpaName") or None)}

    @kopf.index("apps", "v1", "deployments", id="deployment_selectors", registry=registry)
    def deployment_selectors(
        name: str, namespace: str | None, spec: Mapping[str, Any], **_: Any
    ) -> dict[tuple[str, str], Any]:
        return {(namespace or "", name): dict(spec.get("selector") or {})}

    # --- FetchPool ------------------------------------------------------------------------------

    seen_specs: dict[str, str] = {}
    known: dict[str, tuple[str, str]] = {}  # uid -> (namespace, name) of every FetchPool seen

    async def resync_forever() -> None:
        """The safety net: a full round for every FetchPool every ``resync_seconds``.

        A plain task, not ``@kopf.timer``: kopf puts a finalizer on objects with timers, which
        would block deleting a FetchPool while the operator is down.
        """
        while True:
            await asyncio.sleep(config.resync_seconds)
            pools = list(known.values())
            active = [await reconciler.may_act(ns) for ns, _ in pools]
            await asyncio.gather(
                *(
                    reconciler.trigger(ns, name, reason="resync timer", full=True)
                    for (ns, name), act in zip(pools, active, strict=True)
                    if act
                )
            )

    @kopf.on.event(group, version, plural, id="fetchpool_event", registry=registry)
    async def fetchpool_event(
        type: str | None,
        name: str,
        namespace: str | None,
        uid: str,
        spec: Mapping[str, Any],
        fetchpools_by_namespace: Any = None,
        **_: Any,
    ) -> None:
        # Spec changes are detected here, against the last spec seen in memory, rather than with
        # kopf's on.create/on.update: those persist kopf's bookkeeping on the object with patches,
        # and a level-triggered round needs none of it (a restart simply reconciles everything).
        health.event()
        uid = uid or f"{namespace}/{name}"  # always set by a real API server
        if fetchpools_by_namespace is not None:
            health.watched_pools = sum(len(list(store)) for store in fetchpools_by_namespace.values())
        if type == "DELETED":
            seen_specs.pop(uid, None)
            known.pop(uid, None)
            reconciler.forget(namespace or "", name)
            deployment = str((spec.get("target") or {}).get("name") or "")
            for other, target, _hpa in _pools_in(fetchpools_by_namespace, namespace):
                if other != name and target == deployment:
                    await reconciler.trigger(namespace or "", other, reason=f"fetchpool {name} deleted")
            return
        known[uid] = (namespace or "", name)
        fingerprint = resource.dumps(dict(spec))
        if seen_specs.get(uid) != fingerprint:
            reason = "new" if uid not in seen_specs else "spec changed"
            seen_specs[uid] = fingerprint
            await reconciler.trigger(namespace or "", name, reason=f"fetchpool {reason}", full=True)

    # --- HPA, Deployment, Pods (status-only changes included) -----------------------------------

    @kopf.on.event("autoscaling", "v2", "horizontalpodautoscalers", id="hpa_event", registry=registry)
    async def hpa_event(
        body: Mapping[str, Any],
        name: str,
        namespace: str | None,
        fetchpools_by_namespace: Any = None,
        **_: Any,
    ) -> None:
        health.event()
        ref = (body.get("spec") or {}).get("scaleTargetRef") or {}
        for pool, deployment, hpa_name in _pools_in(fetchpools_by_namespace, namespace):
            if hpa_name == name or (
                hpa_name is None and ref.get("kind") == "Deployment" and ref.get("name") == deployment
            ):
                await reconciler.trigger(namespace or "", pool, reason=f"hpa {name}")

    @kopf.on.event("apps", "v1", "deployments", id="deployment_event", registry=registry)
    async def deployment_event(name: str, namespace: str | None, fetchpools_by_namespace: Any = None, **_: Any) -> None:
        health.event()
        for pool, deployment, _hpa in _pools_in(fetchpools_by_namespace, namespace):
            if deployment == name:
                await reconciler.trigger(namespace or "", pool, reason=f"deployment {name}")

    @kopf.on.event("v1", "pods", id="pod_event", registry=registry)
    async def pod_event(
        name: str,
        namespace: str | None,
        labels: Mapping[str, str],
        fetchpools_by_namespace: Any = None,
        deployment_selectors: Any = None,
        **_: Any,
    ) -> None:
        health.event()
        for pool, deployment, _hpa in _pools_in(fetchpools_by_namespace, namespace):
            selector = _first(deployment_selectors.get((namespace, deployment))) if deployment_selectors else None
            if pods.selector_matches(selector, labels):
                await reconciler.trigger(namespace or "", pool, reason=f"pod {name}")
