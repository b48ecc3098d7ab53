{{/*
Names, labels and shared snippets. Conventions of the prometheus-community charts:
selector labels are the immutable subset (name, instance, component); everything else
(chart, version, managed-by, commonLabels) goes only into metadata.labels.
*/}}

{{/* Chart name, overridable with nameOverride. */}}
{{- define "fetchpool.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Full name: <release>-<name>, or the release name alone when it already contains the name.
Truncated to 52 characters so that suffixed names ("-headless", "-operator", "-limits") stay
within 63 characters.
*/}}
{{- define "fetchpool.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "fetchpool.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Names of the parts. */}}
{{- define "fetchpool.headlessName" -}}{{ include "fetchpool.fullname" . }}-headless{{- end -}}
{{- define "fetchpool.configName" -}}{{ include "fetchpool.fullname" . }}-config{{- end -}}
{{- define "fetchpool.limitsName" -}}{{ include "fetchpool.fullname" . }}-limits{{- end -}}
{{- define "fetchpool.operatorName" -}}{{ include "fetchpool.fullname" . }}-operator{{- end -}}
{{- define "fetchpool.testName" -}}{{ include "fetchpool.fullname" . }}-test{{- end -}}
{{- define "fetchpool.fetchPoolName" -}}{{ default (include "fetchpool.fullname" .) .Values.operator.fetchPool.name }}{{- end -}}

{{/* Selector labels shared by every component: immutable, so never the version or chart. */}}
{{- define "fetchpool.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fetchpool.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Selector labels per component. */}}
{{- define "fetchpool.server.selectorLabels" -}}
{{ include "fetchpool.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end -}}

{{- define "fetchpool.operator.selectorLabels" -}}
{{ include "fetchpool.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* Labels of every resource (metadata.labels only). */}}
{{- define "fetchpool.labels" -}}
helm.sh/chart: {{ include "fetchpool.chart" . }}
{{ include "fetchpool.selectorLabels" . }}
app.kubernetes.io/version: {{ (include "fetchpool.imageTag" .) | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fetchpool
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "fetchpool.server.labels" -}}
{{ include "fetchpool.labels" . }}
app.kubernetes.io/component: server
{{- end -}}

{{- define "fetchpool.operator.labels" -}}
{{ include "fetchpool.labels" . }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* metadata.annotations from commonAnnotations plus a dict of extras (call with list ctx extras). */}}
{{- define "fetchpool.annotations" -}}
{{- $ctx := index . 0 -}}
{{- $extra := index . 1 | default dict -}}
{{- $all := merge (deepCopy $extra) (deepCopy ($ctx.Values.commonAnnotations | default dict)) -}}
{{- if $all }}
annotations:
  {{- toYaml $all | nindent 2 }}
{{- end }}
{{- end -}}

{{/* ServiceAccount names. */}}
{{- define "fetchpool.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "fetchpool.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "fetchpool.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (include "fetchpool.operatorName" .) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Images. */}}
{{- define "fetchpool.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag -}}
{{- end -}}

{{- define "fetchpool.imageRef" -}}
{{- $registry := .registry -}}
{{- $ref := .repository -}}
{{- if $registry }}{{ $ref = printf "%s/%s" $registry $ref }}{{ end -}}
{{- if .digest -}}
{{- printf "%s@%s" $ref .digest -}}
{{- else -}}
{{- printf "%s:%s" $ref (toString .tag) -}}
{{- end -}}
{{- end -}}

{{- define "fetchpool.image" -}}
{{- include "fetchpool.imageRef" (dict "registry" .Values.image.registry "repository" .Values.image.repository "tag" (include "fetchpool.imageTag" .) "digest" .Values.image.digest) -}}
{{- end -}}

{{- define "fetchpool.operator.image" -}}
{{- $op := .Values.operator.image -}}
{{- if $op.repository -}}
{{- include "fetchpool.imageRef" (dict "registry" $op.registry "repository" $op.repository "tag" (default (include "fetchpool.imageTag" .) $op.tag) "digest" $op.digest) -}}
{{- else -}}
{{- include "fetchpool.imageRef" (dict "registry" .Values.image.registry "repository" .Values.image.repository "tag" (default (include "fetchpool.imageTag" .) $op.tag) "digest" (default .Values.image.digest $op.digest)) -}}
{{- end -}}
{{- end -}}

{{/*
A number as a plain string: Helm reads values as float64, so 10485760 would print as
1.048576e+07. Whole numbers print as integers, others as they are.
*/}}
{{- define "fetchpool.num" -}}
{{- $f := float64 . -}}
{{- if eq $f (float64 (int64 $f)) -}}{{ int64 $f }}{{- else -}}{{ $f }}{{- end -}}
{{- end -}}

{{/* The fixed gRPC container port (the operator reaches every pod on it). */}}
{{- define "fetchpool.grpcPort" -}}50051{{- end -}}

{{/* Effective terminationGracePeriodSeconds. */}}
{{- define "fetchpool.terminationGracePeriodSeconds" -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds -}}
{{- add (ceil .Values.config.gracePeriod | int64) (int64 .Values.preStopDelaySeconds) 10 -}}
{{- else -}}
{{- int64 .Values.terminationGracePeriodSeconds -}}
{{- end -}}
{{- end -}}

{{/* Secrets and their keys. */}}
{{- define "fetchpool.proxySecretName" -}}
{{- default (printf "%s-proxy" (include "fetchpool.fullname" .)) .Values.proxy.existingSecret -}}
{{- end -}}
{{- define "fetchpool.proxySecretKey" -}}
{{- if .Values.proxy.existingSecret }}{{ .Values.proxy.existingSecretKey }}{{ else }}proxy-urls{{ end -}}
{{- end -}}
{{- define "fetchpool.proxyEnabled" -}}
{{- if or .Values.proxy.existingSecret .Values.proxy.urls }}true{{ end -}}
{{- end -}}
{{- define "fetchpool.authSecretName" -}}
{{- default (printf "%s-auth" (include "fetchpool.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}
{{- define "fetchpool.authSecretKey" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecretKey }}{{ else }}token{{ end -}}
{{- end -}}
{{- define "fetchpool.adminSecretName" -}}
{{- default (printf "%s-admin" (include "fetchpool.fullname" .)) .Values.adminAuth.existingSecret -}}
{{- end -}}
{{- define "fetchpool.adminSecretKey" -}}
{{- if .Values.adminAuth.existingSecret }}{{ .Values.adminAuth.existingSecretKey }}{{ else }}token{{ end -}}
{{- end -}}

{{/*
The token the operator sends to the pods' PoolAdmin: the admin token, or without one the fetch
token (the pods then let its holders change limits). JSON {"secret", "key"}, or "" for none.
*/}}
{{- define "fetchpool.operatorToken" -}}
{{- if .Values.adminAuth.enabled -}}
{{- toJson (dict "secret" (include "fetchpool.adminSecretName" .) "key" (include "fetchpool.adminSecretKey" .)) -}}
{{- else if .Values.auth.enabled -}}
{{- toJson (dict "secret" (include "fetchpool.authSecretName" .) "key" (include "fetchpool.authSecretKey" .)) -}}
{{- end -}}
{{- end -}}

{{/*
What the operator does with the defaults it is given, for NOTES.txt: the ceiling (the scaler's most
replicas plus the Deployment's maxSurge, rounded up as Kubernetes does) and each replica's share at
the smallest replica count. JSON {"ceiling", "replicas", "share", "scaler"}.
*/}}
{{- define "fetchpool.budgetPlan" -}}
{{- $v := .Values -}}
{{- $fp := $v.operator.fetchPool -}}
{{- $most := int64 $v.replicaCount -}}
{{- $least := int64 $v.replicaCount -}}
{{- $scaler := "nothing scales it: its replicas (kubectl scale re-divides)" -}}
{{- if $v.autoscaling.enabled -}}
{{- $most = int64 $v.autoscaling.maxReplicas -}}{{- $least = int64 $v.autoscaling.minReplicas -}}
{{- $scaler = printf "HorizontalPodAutoscaler %s" (include "fetchpool.hpaName" .) -}}
{{- else if $v.keda.enabled -}}
{{- $most = int64 $v.keda.maxReplicaCount -}}{{- $least = max 1 (int64 $v.keda.minReplicaCount) | int64 -}}
{{- $scaler = printf "KEDA's HorizontalPodAutoscaler %s" (include "fetchpool.hpaName" .) -}}
{{- end -}}
{{- $surge := int64 0 -}}
{{- if ne (($v.updateStrategy | default dict).type | default "RollingUpdate") "Recreate" -}}
{{- $raw := ((($v.updateStrategy | default dict).rollingUpdate | default dict).maxSurge) | default "25%" | toString -}}
{{- if hasSuffix "%" $raw -}}
{{- $surge = div (add (mul $most (trimSuffix "%" $raw | int64)) 99) 100 -}}
{{- else -}}
{{- $surge = int64 $raw -}}
{{- end -}}
{{- end -}}
{{- $ceiling := add $most $surge -}}
{{- $share := div (sub (int64 $fp.connectionBudget) (mul (int64 $fp.minPerReplica) (sub $ceiling $least))) $least -}}
{{- $share = min $share (int64 $fp.maxPerReplica) | int64 -}}
{{- $share = max $share (int64 $fp.minPerReplica) | int64 -}}
{{- toJson (dict "ceiling" $ceiling "replicas" $least "share" $share "scaler" $scaler) -}}
{{- end -}}

{{- define "fetchpool.tlsClientSecret" -}}
{{- default .Values.tls.existingSecret .Values.tls.clientSecret -}}
{{- end -}}
{{- define "fetchpool.tlsServerName" -}}
{{- default (printf "%s.%s.svc" (include "fetchpool.fullname" .) .Release.Namespace) .Values.tls.serverName -}}
{{- end -}}

{{/* Namespaces the operator watches. */}}
{{- define "fetchpool.operator.namespaces" -}}
{{- if .Values.operator.watchNamespaces -}}
{{- toJson (uniq .Values.operator.watchNamespaces) -}}
{{- else -}}
{{- toJson (list .Release.Namespace) -}}
{{- end -}}
{{- end -}}

{{/* Name of the HPA the operator follows. */}}
{{- define "fetchpool.hpaName" -}}
{{- if .Values.operator.fetchPool.hpaName -}}
{{- .Values.operator.fetchPool.hpaName -}}
{{- else if .Values.autoscaling.enabled -}}
{{- include "fetchpool.fullname" . -}}
{{- else if .Values.keda.enabled -}}
{{- printf "keda-hpa-%s" (include "fetchpool.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/*
gRPC health check run inside the container (exec probes under TLS, where the kubelet's gRPC
probe cannot connect, and the helm test). Arguments: service name. Uses the env of the container:
FP_TARGET, FP_TLS_CA, FP_TLS_CERT, FP_TLS_KEY, FP_TLS_SERVER_NAME, FP_TOKEN_FILE.
*/}}
{{- define "fetchpool.healthCheckPy" -}}
import os, sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
def channel():
    target = os.environ["FP_TARGET"]
    ca = os.environ.get("FP_TLS_CA")
    if not ca:
        return grpc.insecure_channel(target)
    read = lambda p: open(p, "rb").read() if p else None
    creds = grpc.ssl_channel_credentials(read(ca), read(os.environ.get("FP_TLS_KEY")), read(os.environ.get("FP_TLS_CERT")))
    name = os.environ.get("FP_TLS_SERVER_NAME")
    return grpc.secure_channel(target, creds, [("grpc.ssl_target_name_override", name)] if name else [])
def metadata():
    path = os.environ.get("FP_TOKEN_FILE")
    return [("authorization", "Bearer " + open(path).read().strip())] if path else []
service = sys.argv[1] if len(sys.argv) > 1 else ""
with channel() as ch:
    status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=float(os.environ.get("FP_TIMEOUT", "3")), metadata=metadata()).status
print("health", repr(service), health_pb2.HealthCheckResponse.ServingStatus.Name(status))
sys.exit(0 if status == health_pb2.HealthCheckResponse.SERVING else 1)
{{- end -}}

{{/*
Validation of values that JSON Schema cannot express (relations between fields). Every message
names the values to change. Included by templates/validate.yaml.
*/}}
{{- define "fetchpool.validate" -}}
{{- $v := .Values -}}
{{- /* values.schema.json says the same first; this holds with --skip-schema-validation too. */ -}}
{{- if not $v.image.repository -}}
{{- fail "image.repository is not set: no public registry hosts the fetchpool image. Build it with `make image`, push it to a registry your cluster pulls from, then set image.registry and image.repository (and image.tag or image.digest); see The image in the chart README" -}}
{{- end -}}
{{- if and $v.metrics.grafanaDashboard.enabled (not $v.metrics.enabled) -}}
{{- fail "metrics.grafanaDashboard.enabled needs metrics.enabled (the dashboard shows the service's Prometheus metrics)" -}}
{{- end -}}
{{- if and $v.metrics.prometheusRule.enabled (not $v.metrics.enabled) -}}
{{- fail "metrics.prometheusRule.enabled needs metrics.enabled (the alerts read the service's Prometheus metrics)" -}}
{{- end -}}
{{- if and $v.autoscaling.enabled $v.keda.enabled -}}
{{- fail "autoscaling.enabled and keda.enabled are mutually exclusive: KEDA creates its own HPA. Enable one of them." -}}
{{- end -}}
{{- if and $v.autoscaling.enabled (gt (int64 $v.autoscaling.minReplicas) (int64 $v.autoscaling.maxReplicas)) -}}
{{- fail (printf "autoscaling.minReplicas (%d) must not exceed autoscaling.maxReplicas (%d)" (int64 $v.autoscaling.minReplicas) (int64 $v.autoscaling.maxReplicas)) -}}
{{- end -}}
{{- if and $v.keda.enabled (gt (int64 $v.keda.minReplicaCount) (int64 $v.keda.maxReplicaCount)) -}}
{{- fail (printf "keda.minReplicaCount (%d) must not exceed keda.maxReplicaCount (%d)" (int64 $v.keda.minReplicaCount) (int64 $v.keda.maxReplicaCount)) -}}
{{- end -}}
{{- if and $v.keda.enabled (not $v.keda.prometheus.serverAddress) (not $v.keda.extraTriggers) -}}
{{- fail "keda.enabled needs keda.prometheus.serverAddress (or keda.extraTriggers)" -}}
{{- end -}}
{{- if $v.autoscaling.enabled -}}
{{- $cpu := not (kindIs "invalid" $v.autoscaling.targetCPUUtilizationPercentage) -}}
{{- $mem := not (kindIs "invalid" $v.autoscaling.targetMemoryUtilizationPercentage) -}}
{{- $requests := (($v.resources | default dict).requests | default dict) -}}
{{- if and $cpu (not $requests.cpu) -}}
{{- fail "autoscaling.targetCPUUtilizationPercentage needs resources.requests.cpu (utilization is a percentage of the request); set it or set the target to null" -}}
{{- end -}}
{{- if and $mem (not $requests.memory) -}}
{{- fail "autoscaling.targetMemoryUtilizationPercentage needs resources.requests.memory; set it or set the target to null" -}}
{{- end -}}
{{- if not (or $cpu $mem $v.autoscaling.demand.enabled $v.autoscaling.extraMetrics) -}}
{{- fail "autoscaling.enabled needs a metric: targetCPUUtilizationPercentage, targetMemoryUtilizationPercentage, demand.enabled or extraMetrics" -}}
{{- end -}}
{{- end -}}
{{- if and $v.pdb.enabled (not (kindIs "invalid" $v.pdb.minAvailable)) (not (kindIs "invalid" $v.pdb.maxUnavailable)) -}}
{{- fail "pdb.minAvailable and pdb.maxUnavailable are mutually exclusive: set the other to null" -}}
{{- end -}}
{{- if and $v.pdb.enabled (kindIs "invalid" $v.pdb.minAvailable) (kindIs "invalid" $v.pdb.maxUnavailable) -}}
{{- fail "pdb.enabled needs pdb.minAvailable or pdb.maxUnavailable" -}}
{{- end -}}
{{- if and $v.tls.enabled (not $v.tls.existingSecret) -}}
{{- fail "tls.enabled needs tls.existingSecret (a kubernetes.io/tls Secret with tls.crt, tls.key and ca.crt)" -}}
{{- end -}}
{{- if and $v.tls.clientAuth (not $v.tls.enabled) -}}
{{- fail "tls.clientAuth needs tls.enabled" -}}
{{- end -}}
{{- if and $v.auth.enabled (not $v.auth.existingSecret) (not $v.auth.token) -}}
{{- fail "auth.enabled needs auth.existingSecret (or auth.token)" -}}
{{- end -}}
{{- /* otel.endpoint, or the endpoint given as an extra environment variable */ -}}
{{- $otlpEnv := hasKey ($v.config.extraEnv | default dict) "OTEL_EXPORTER_OTLP_ENDPOINT" -}}
{{- range ($v.extraEnv | default list) }}{{ if eq .name "OTEL_EXPORTER_OTLP_ENDPOINT" }}{{ $otlpEnv = true }}{{ end }}{{ end -}}
{{- if and $v.otel.enabled (not $v.otel.endpoint) (not $otlpEnv) -}}
{{- fail "otel.enabled needs otel.endpoint, the OTLP collector's address (e.g. http://otel-collector.observability.svc.cluster.local:4317; http://localhost:4317 for a collector sidecar): without it the pods export to localhost:4317 in the pod" -}}
{{- end -}}
{{- if and $v.metrics.serviceMonitor.enabled (not $v.metrics.enabled) -}}
{{- fail "metrics.serviceMonitor.enabled needs metrics.enabled" -}}
{{- end -}}
{{- if and $v.autoscaling.enabled $v.autoscaling.demand.enabled (not $v.metrics.enabled) -}}
{{- fail "autoscaling.demand.enabled needs metrics.enabled (the demand metric is scraped from the pods)" -}}
{{- end -}}
{{- if and $v.metrics.enabled (eq (int64 $v.metrics.port) 50051) -}}
{{- fail (printf "metrics.port (%d) must differ from the gRPC port 50051" (int64 $v.metrics.port)) -}}
{{- end -}}
{{- $grace := add (ceil $v.config.gracePeriod | int64) (int64 $v.preStopDelaySeconds) -}}
{{- if le (int64 (include "fetchpool.terminationGracePeriodSeconds" .)) $grace -}}
{{- fail (printf "terminationGracePeriodSeconds (%s) must exceed config.gracePeriod + preStopDelaySeconds (%d), or the kubelet kills the server before it has drained" (include "fetchpool.terminationGracePeriodSeconds" .) $grace) -}}
{{- end -}}
{{- if and $v.operator.enabled $v.operator.fetchPool.create (gt (int64 $v.operator.fetchPool.minPerReplica) (int64 $v.operator.fetchPool.maxPerReplica)) -}}
{{- fail (printf "operator.fetchPool.minPerReplica (%d) must not exceed operator.fetchPool.maxPerReplica (%d)" (int64 $v.operator.fetchPool.minPerReplica) (int64 $v.operator.fetchPool.maxPerReplica)) -}}
{{- end -}}
{{- if and $v.operator.enabled $v.operator.fetchPool.create (lt (int64 $v.operator.fetchPool.connectionBudget) (int64 $v.operator.fetchPool.minPerReplica)) -}}
{{- fail "operator.fetchPool.connectionBudget must be at least operator.fetchPool.minPerReplica" -}}
{{- end -}}
{{- if and $v.operator.enabled $v.operator.clusterWide $v.operator.watchNamespaces -}}
{{- fail "operator.clusterWide watches every namespace: leave operator.watchNamespaces empty" -}}
{{- end -}}
{{- if and $v.keda.enabled $v.keda.prometheus.serverAddress (not $v.metrics.enabled) -}}
{{- fail "keda.prometheus.serverAddress needs metrics.enabled (the trigger queries fetchpool_demand_requests, scraped from the pods' metrics port)" -}}
{{- end -}}
{{- if and $v.operator.enabled $v.operator.metrics.enabled (eq (int64 $v.operator.metrics.port) (int64 $v.operator.livenessPort)) -}}
{{- fail (printf "operator.metrics.port (%d) must differ from operator.livenessPort" (int64 $v.operator.metrics.port)) -}}
{{- end -}}
{{- if and $v.operator.metrics.podMonitor.enabled (not (and $v.operator.enabled $v.operator.metrics.enabled)) -}}
{{- fail "operator.metrics.podMonitor.enabled needs operator.enabled and operator.metrics.enabled" -}}
{{- end -}}
{{- if and $v.tests.enabled (not $v.tests.fetchUrl) $v.ssrf.enabled (not $v.ssrf.allowTargets) -}}
{{- fail "tests.fetchUrl is empty, so the helm test pod serves the page itself, at its pod IP: a cluster-internal address the SSRF guard refuses. Set tests.fetchUrl to a public URL, or allow your pod network in ssrf.allowTargets" -}}
{{- end -}}
{{- if gt (int64 $v.config.limits.maxKeepaliveConnections) (int64 $v.config.limits.maxConnections) -}}
{{- fail (printf "config.limits.maxKeepaliveConnections (%d) must not exceed config.limits.maxConnections (%d)" (int64 $v.config.limits.maxKeepaliveConnections) (int64 $v.config.limits.maxConnections)) -}}
{{- end -}}
{{- end -}}

{{/* OTEL_RESOURCE_ATTRIBUTES: downward-API values (expanded by the kubelet) plus extras. */}}
{{- define "fetchpool.otelResourceAttributes" -}}
{{- $attrs := list
  "k8s.pod.name=$(K8S_POD_NAME)"
  "k8s.pod.uid=$(K8S_POD_UID)"
  "k8s.namespace.name=$(K8S_NAMESPACE_NAME)"
  "k8s.node.name=$(K8S_NODE_NAME)"
  (printf "k8s.deployment.name=%s" (include "fetchpool.fullname" .))
  (printf "service.version=%s" (include "fetchpool.imageTag" .))
  "service.instance.id=$(K8S_POD_NAME)" -}}
{{- range $k, $val := .Values.otel.resourceAttributes -}}
{{- $attrs = append $attrs (printf "%s=%s" $k (toString $val)) -}}
{{- end -}}
{{- join "," $attrs -}}
{{- end -}}

{{/*
Health probe: the kubelet's native gRPC probe; with TLS an exec probe running the same check in
the container. dict: ctx, service, probe (periodSeconds, timeoutSeconds, failureThreshold).
*/}}
{{- define "fetchpool.healthProbe" -}}
{{- $ctx := .ctx -}}
{{- if $ctx.Values.tls.enabled -}}
exec:
  command:
    - python3
    - -c
    - {{ include "fetchpool.healthCheckPy" $ctx | toJson }}
    - {{ .service | quote }}
timeoutSeconds: {{ max (int .probe.timeoutSeconds) 5 }}
{{- else -}}
grpc:
  port: {{ include "fetchpool.grpcPort" $ctx }}
  service: {{ .service | quote }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
{{- end }}
periodSeconds: {{ .probe.periodSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
{{- end -}}

{{/* Environment of the in-container health check. dict: ctx, target, tlsDir. */}}
{{- define "fetchpool.healthCheckEnv" -}}
{{- $v := .ctx.Values -}}
- name: FP_TARGET
  value: {{ .target | quote }}
{{- if $v.tls.enabled }}
- name: FP_TLS_CA
  value: {{ printf "%s/ca.crt" .tlsDir | quote }}
- name: FP_TLS_SERVER_NAME
  value: {{ include "fetchpool.tlsServerName" .ctx | quote }}
{{- if $v.tls.clientAuth }}
- name: FP_TLS_CERT
  value: {{ printf "%s/tls.crt" .tlsDir | quote }}
- name: FP_TLS_KEY
  value: {{ printf "%s/tls.key" .tlsDir | quote }}
{{- end }}
{{- end }}
{{- if $v.auth.enabled }}
- name: FP_TOKEN_FILE
  value: /etc/fetchpool/auth/token
{{- end }}
{{- end -}}

{{/*
The operator's RBAC rules on namespaced resources (in each Role, or in the ClusterRole); the
peering rules are added in templates/operator-rbac.yaml. Exactly what fetchpool.operator (k8s.py,
handlers.py) and kopf 1.45 use:
  fetchpools               get and list (reconciler: its own, and others on the same Deployment),
                           list/watch (kopf's watch and index). No patch: the
                           operator writes no finalizers, annotations or spec, only the status.
  fetchpools/status        patch
  hpas, deployments       get/list/watch (kopf's watches and indexes, the reconciler's reads)
  pods                     list/watch (kopf's watch, the reconciler's list by selector; never a get)
  configmaps               get/create/patch (the limits ConfigMap: read, merge-patch, create if missing)
  events                   create (kopf posts warnings as Events, core v1 group)
*/}}
{{- define "fetchpool.operator.rules" -}}
- apiGroups: ["fetchpool.io"]
  resources: ["fetchpools"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["fetchpool.io"]
  resources: ["fetchpools/status"]
  verbs: ["patch"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "patch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}

{{/*
kopf peering rules (operator.peering.enabled): kopf watches the peering resource (list/watch, every
object of the kind: kopf sets no field selector) and patches its own keep-alive into the status of
the object NAME (get/patch, limited to that name; the operator's resync loop and retries also get
it, to stop while another peer is in charge). Namespaced peering (`kopfpeerings`) in a Role,
cluster-wide peering (`clusterkopfpeerings`) in the ClusterRole: kopf's peering follows the
operator's scope. Argument: the resource (kopfpeerings or clusterkopfpeerings); uses $.ctx.
*/}}
{{- define "fetchpool.operator.peeringRules" -}}
- apiGroups: ["kopf.dev"]
  resources: [{{ .resource | quote }}]
  verbs: ["list", "watch"]
- apiGroups: ["kopf.dev"]
  resources: [{{ .resource | quote }}]
  resourceNames: [{{ include "fetchpool.peeringName" .ctx | quote }}]
  verbs: ["get", "patch"]
{{- end -}}

{{/* The kopf peering name: per release, so that operators of other releases never pause this one. */}}
{{- define "fetchpool.peeringName" -}}
{{- if .Values.operator.peering.name -}}
{{- .Values.operator.peering.name -}}
{{- else if .Values.operator.clusterWide -}}
{{- printf "%s-%s" .Release.Namespace (include "fetchpool.operatorName" .) | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- include "fetchpool.operatorName" . -}}
{{- end -}}
{{- end -}}

{{/* FETCHPOOL_DENY_TARGETS: ssrf.denyTargets plus the cluster's Service CIDRs (empty: none). */}}
{{- define "fetchpool.denyTargets" -}}
{{- concat (.Values.ssrf.denyTargets | default list) (.Values.ssrf.serviceCIDRs | default list) | uniq | join "," -}}
{{- end -}}

{{/* The `helm test` program: health (overall and FetchService), then one fetch. */}}
{{- define "fetchpool.testPy" -}}
import http.server, json, os, sys, threading, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from fetchpool.v1 import fetch_pb2, fetch_pb2_grpc
def channel():
    target = os.environ["FP_TARGET"]
    ca = os.environ.get("FP_TLS_CA")
    if not ca:
        return grpc.insecure_channel(target)
    read = lambda p: open(p, "rb").read() if p else None
    creds = grpc.ssl_channel_credentials(read(ca), read(os.environ.get("FP_TLS_KEY")), read(os.environ.get("FP_TLS_CERT")))
    name = os.environ.get("FP_TLS_SERVER_NAME")
    return grpc.secure_channel(target, creds, [("grpc.ssl_target_name_override", name)] if name else [])
path = os.environ.get("FP_TOKEN_FILE")
metadata = [("authorization", "Bearer " + open(path).read().strip())] if path else []
timeout = float(os.environ.get("FP_TIMEOUT", "10"))
marker = "fetchpool helm test"
url = os.environ.get("FP_FETCH_URL", "")
if not url:
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = marker.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
    server = http.server.ThreadingHTTPServer(("", int(os.environ["FP_HTTP_PORT"])), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ip = os.environ["FP_POD_IP"]
    url = "http://%s:%s/" % ("[%s]" % ip if ":" in ip else ip, os.environ["FP_HTTP_PORT"])
with channel() as ch:
    health = health_pb2_grpc.HealthStub(ch)
    for service in ("", "fetchpool.v1.FetchService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout, metadata=metadata).status
        print("health", repr(service), health_pb2.HealthCheckResponse.ServingStatus.Name(status), flush=True)
        if status != health_pb2.HealthCheckResponse.SERVING:
            sys.exit(1)
    result = fetch_pb2_grpc.FetchServiceStub(ch).Fetch(fetch_pb2.FetchRequest(id="helm-test", url=url), timeout=60, metadata=metadata)
    print(json.dumps({"url": url, "status_code": result.status_code, "error": str(result.error) if result.HasField("error") else None, "bytes": len(result.body)}), flush=True)
    if result.HasField("error") or not 200 <= result.status_code < 400:
        sys.exit(1)
    if not os.environ.get("FP_FETCH_URL") and result.body.decode(errors="replace") != marker:
        sys.exit("unexpected body: %r" % result.body[:200])
print("ok")
{{- end -}}

{{/* An alert's runbook_url annotation line (nothing without metrics.prometheusRule.runbookUrl). list: the prometheusRule values, the alert's name. */}}
{{- define "fetchpool.runbookUrl" -}}
{{- $url := (index . 0).runbookUrl -}}
{{- if $url -}}
runbook_url: {{ printf "%s#%s" $url (lower (index . 1)) | quote }}
{{- end -}}
{{- end -}}
