"""Thin Kubernetes I/O for the operator, on the official ``kubernetes`` client.

Every call returns plain JSON dicts (``_preload_content=False`` and :func:`json.loads`), so nothing
depends on the client's model classes, and runs the synchronous client in a worker thread
(:func:`asyncio.to_thread`) so the kopf event loop never blocks. Patches are JSON merge patches
(``application/merge-patch+json``; strategic merge is not defined for custom resources) and are
retried on ``409 Conflict`` (:func:`retry_on_conflict`). Reads return ``None`` for ``404``.

RBAC this needs (namespaced or cluster-wide): ``get/list/watch`` on ``fetchpools``,
``horizontalpodautoscalers``, ``deployments`` and ``pods``; ``patch`` on ``fetchpools/status``;
``get/create/patch`` on ``configmaps``; ``create`` on ``events`` (kopf posts events); ``get`` on
the kopf peering object when peering is on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import kubernetes
from kubernetes.client.exceptions import ApiException

from fetchpool.operator import pods, resource

__all__ = ["ConflictError", "KubeIO", "load_api_client", "retry_on_conflict"]

log = logging.getLogger(__name__)

T = TypeVar("T")

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


class ConflictError(RuntimeError):
    """A write still conflicted (409) after every retry."""


async def retry_on_conflict(call: Callable[[], Awaitable[T]], *, attempts: int = 5, base_delay: float = 0.05) -> T:
    """Run ``call``; on ``409 Conflict`` retry up to ``attempts`` times with jittered backoff.

    ``call`` must re-read whatever it needs (it is level-triggered), so a retry after a conflict
    writes a value computed from the newer object, not a stale one.
    """
    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except ApiException as exc:
            if exc.status != 409 or attempt == attempts:
                if exc.status == 409:
                    raise ConflictError(f"still conflicting after {attempts} attempts: {exc.reason}") from exc
                raise
            delay = base_delay * (2 ** (attempt - 1)) * (0.5 + random.random())
            log.debug("409 Conflict, retry %d/%d in %.3fs", attempt, attempts, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def load_api_client() -> kubernetes.client.ApiClient:
    """An API client configured in-cluster (service account) or from ``$KUBECONFIG`` / ``~/.kube/config``."""
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    except kubernetes.config.ConfigException:
        import os

        kubernetes.config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG") or None, client_configuration=configuration
        )
    return kubernetes.client.ApiClient(configuration)


def _json(response: Any) -> dict[str, Any]:
    data = response.data if hasattr(response, "data") else response
    if isinstance(data, bytes | str):
        loaded = json.loads(data or b"{}")
        return loaded if isinstance(loaded, dict) else {}
    return data if isinstance(data, dict) else {}


class KubeIO:
    """The operator's reads and writes; one instance per API client."""

    def __init__(self, api_client: kubernetes.client.ApiClient, *, request_timeout: float = 10.0) -> None:
        self.api_client = api_client
        self._core = kubernetes.client.CoreV1Api(api_client)
        self._apps = kubernetes.client.AppsV1Api(api_client)
        self._autoscaling = kubernetes.client.AutoscalingV2Api(api_client)
        self._custom = kubernetes.client.CustomObjectsApi(api_client)
        self._timeout = request_timeout

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        kwargs.setdefault("_preload_content", False)
        kwargs.setdefault("_request_timeout", self._timeout)
        response = await asyncio.to_thread(fn, *args, **kwargs)
        return _json(response)

    async def _get(self, fn: Callable[..., Any], *args: Any) -> dict[str, Any] | None:
        try:
            return await self._call(fn, *args)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    # --- reads ------------------------------------------------------------------------------

    async def get_fetchpool(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The ``FetchPool`` or ``None``."""
        return await self._get(
            self._custom.get_namespaced_custom_object,
            resource.GROUP,
            resource.VERSION,
            namespace,
            resource.PLURAL,
            name,
        )

    async def list_fetchpools(self, namespace: str) -> list[dict[str, Any]]:
        """Every ``FetchPool`` of ``namespace``."""
        listing = await self._call(
            self._custom.list_namespaced_custom_object, resource.GROUP, resource.VERSION, namespace, resource.PLURAL
        )
        return [dict(item) for item in listing.get("items") or []]

    async def get_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Deployment or ``None``."""
        return await self._get(self._apps.read_namespaced_deployment, name, namespace)

    async def find_hpa(self, namespace: str, deployment: str, hpa_name: str | None) -> dict[str, Any] | None:
        """The named HPA, or the one whose ``scaleTargetRef`` is ``Deployment/<deployment>``."""
        if hpa_name:
            return await self._get(self._autoscaling.read_namespaced_horizontal_pod_autoscaler, hpa_name, namespace)
        listing = await self._call(self._autoscaling.list_namespaced_horizontal_pod_autoscaler, namespace)
        for hpa in listing.get("items") or []:
            ref = (hpa.get("spec") or {}).get("scaleTargetRef") or {}
            if ref.get("kind") == "Deployment" and ref.get("name") == deployment:
                return dict(hpa)
        return None

    async def list_pods(self, namespace: str, selector: Mapping[str, Any] | None) -> list[dict[str, Any]]:
        """Pods matching the Deployment's selector (filtered server-side and again here)."""
        listing = await self._call(
            self._core.list_namespaced_pod,
            namespace,
            label_selector=pods.label_selector_string(selector) or None,
        )
        return [
            dict(pod)
            for pod in listing.get("items") or []
            if pods.selector_matches(selector, (pod.get("metadata") or {}).get("labels"))
        ]

    async def get_peering(self, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The kopf peering object ``name``: a ``KopfPeering`` of ``namespace``, or the
        ``ClusterKopfPeering`` when ``namespace`` is ``None``; ``None`` when it does not exist."""
        if namespace is None:
            return await self._get(
                self._custom.get_cluster_custom_object, "kopf.dev", "v1", "clusterkopfpeerings", name
            )
        return await self._get(
            self._custom.get_namespaced_custom_object, "kopf.dev", "v1", namespace, "kopfpeerings", name
        )

    async def get_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The ConfigMap or ``None``."""
        return await self._get(self._core.read_namespaced_config_map, name, namespace)

    # --- writes -----------------------------------------------------------------------------

    async def write_configmap(
        self,
        namespace: str,
        name: str,
        data: Mapping[str, str],
        *,
        owner: Mapping[str, Any] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        """Create the ConfigMap, or merge-patch its ``data`` when it exists."""
        metadata: dict[str, Any] = {"name": name, "namespace": namespace}
        if labels:
            metadata["labels"] = dict(labels)
        if owner:
            metadata["ownerReferences"] = [dict(owner)]

        async def attempt() -> None:
            try:
                await self._call(
                    self._core.patch_namespaced_config_map,
                    name,
                    namespace,
                    {"data": dict(data)},
                    _content_type=MERGE_PATCH,
                )
            except ApiException as exc:
                if exc.status != 404:
                    raise
                body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": dict(data)}
                await self._call(self._core.create_namespaced_config_map, namespace, body)

        await retry_on_conflict(attempt)

    async def patch_fetchpool_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """Merge-patch ``FetchPool.status`` through the ``/status`` subresource (retried on 409)."""

        async def attempt() -> None:
            await self._call(
                self._custom.patch_namespaced_custom_object_status,
                resource.GROUP,
                resource.VERSION,
                namespace,
                resource.PLURAL,
                name,
                {"status": dict(status)},
                _content_type=MERGE_PATCH,
            )

        await retry_on_conflict(attempt)
