{{/* Names and labels ---------------------------------------------------------------------- */}}
{{- define "lmforge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "lmforge.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains (include "lmforge.name" .) .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "lmforge.name" .) | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "lmforge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lmforge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "lmforge.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "lmforge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lmforge
{{- end -}}

{{- define "lmforge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "lmforge.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "lmforge.image" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}

{{/* Service addresses ------------------------------------------------------------------------- */}}
{{- define "lmforge.mlflowUrl" -}}
{{- printf "http://%s-mlflow.%s.svc:%d" (include "lmforge.fullname" .) .Release.Namespace (int .Values.mlflow.port) -}}
{{- end -}}

{{- define "lmforge.s3Endpoint" -}}
{{- if .Values.s3.endpoint -}}
{{- .Values.s3.endpoint -}}
{{- else -}}
{{- printf "http://%s-minio.%s.svc:9000" (include "lmforge.fullname" .) .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* Security: non-root, read-only root filesystem, no capabilities, RuntimeDefault seccomp ----- */}}
{{- define "lmforge.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .uid }}
fsGroup: {{ .uid }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "lmforge.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Environment shared by every lmforge container (MLflow, S3) -------------------------------- */}}
{{- define "lmforge.env" -}}
- name: MLFLOW_TRACKING_URI
  value: {{ include "lmforge.mlflowUrl" . | quote }}
- name: LMFORGE_S3_ENDPOINT
  value: {{ include "lmforge.s3Endpoint" . | quote }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ include "lmforge.s3Endpoint" . | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.s3.region | quote }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ .Values.s3.existingSecret | quote }}, key: AWS_ACCESS_KEY_ID}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ .Values.s3.existingSecret | quote }}, key: AWS_SECRET_ACCESS_KEY}
- name: HOME
  value: /workspace
- name: LMFORGE_MODEL_CACHE
  value: /models
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- end -}}

{{/* The Ray Serve config (serveConfigV2) generated from .Values.serving ------------------------ */}}
{{- define "lmforge.serveConfig" -}}
{{- $s := .Values.serving -}}
{{- $app := dict "name" "lmforge" "route_prefix" "/" -}}
{{- if eq $s.backend "lmforge" -}}
{{- $args := deepCopy $s.lmforge -}}
{{- $_ := set $args "model" $s.model -}}
{{- if $s.servedModelName }}{{ $_ := set $args "served_model_name" $s.servedModelName }}{{ end -}}
{{- $_ := set $args "host" "0.0.0.0" -}}
{{- $_ := set $args "port" 8000 -}}
{{- $_ := set $args "api_keys_file" "/etc/lmforge/api-keys/keys" -}}
{{- if $s.adminApiKeys.existingSecret }}{{ $_ := set $args "admin_api_keys_file" "/etc/lmforge/admin-keys/keys" }}{{ end -}}
{{- $_ := set $args "model_cache_dir" "/models" -}}
{{- $_ := set $args "num_cpus" $s.replicaResources.cpus -}}
{{- $_ := set $args "num_gpus" $s.replicaResources.gpus -}}
{{- if $s.autoscaling.enabled -}}
{{- $_ := set $args "autoscaling" (dict "min_replicas" $s.autoscaling.minReplicas "max_replicas" $s.autoscaling.maxReplicas "target_ongoing_requests" $s.autoscaling.targetOngoingRequests) -}}
{{- else -}}
{{- $_ := set $args "replicas" $s.replicas -}}
{{- end -}}
{{- $_ := set $app "import_path" "lmforge.serving.app:app_builder" -}}
{{- $_ := set $app "args" $args -}}
{{- else -}}
{{- $deployment := dict -}}
{{- if $s.autoscaling.enabled -}}
{{- $_ := set $deployment "autoscaling_config" (dict "min_replicas" $s.autoscaling.minReplicas "max_replicas" $s.autoscaling.maxReplicas "target_ongoing_requests" $s.autoscaling.targetOngoingRequests) -}}
{{- else -}}
{{- $_ := set $deployment "num_replicas" $s.replicas -}}
{{- end -}}
{{- $modelId := $s.servedModelName | default (regexReplaceAll "^models:/([^@/]+).*$" $s.model "${1}") -}}
{{- $llm := dict "model_loading_config" (dict "model_id" $modelId "model_source" "/models/current") "engine_kwargs" $s.vllm.engineKwargs "deployment_config" $deployment -}}
{{- if $s.vllm.acceleratorType }}{{ $_ := set $llm "accelerator_type" $s.vllm.acceleratorType }}{{ end -}}
{{- $_ := set $app "import_path" "ray.serve.llm:build_openai_app" -}}
{{- $_ := set $app "args" (dict "llm_configs" (list $llm)) -}}
{{- end -}}
{{- $cfg := dict "proxy_location" "EveryNode" "http_options" (dict "host" "0.0.0.0" "port" 8000) "applications" (list $app) -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* One Ray container (head or worker) of the project image ----------------------------------- */}}
{{- define "lmforge.rayContainer" -}}
{{- $root := .root -}}
- name: {{ .name }}
  image: {{ .image }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  securityContext:
    {{- include "lmforge.containerSecurityContext" $root | nindent 4 }}
  env:
    {{- include "lmforge.env" $root | nindent 4 }}
  ports:
    {{- toYaml .ports | nindent 4 }}
  resources:
    {{- $res := deepCopy .resources -}}
    {{- if gt (int .gpus) 0 -}}
    {{- $_ := set $res "limits" (merge (dict "nvidia.com/gpu" (int .gpus)) ($res.limits | default dict)) -}}
    {{- $_ := set $res "requests" (merge (dict "nvidia.com/gpu" (int .gpus)) ($res.requests | default dict)) -}}
    {{- end }}
    {{- toYaml $res | nindent 4 }}
  # Probes with the image's Python (KubeRay's defaults shell out to wget, which a slim image lacks):
  # the local raylet answers. Traffic goes to a pod only once KubeRay saw its Serve proxy healthy.
  livenessProbe:
    exec:
      command: ["python3", "-c", "import urllib.request as u; u.urlopen('http://localhost:52365/api/local_raylet_healthz', timeout=3)"]
    initialDelaySeconds: 30
    periodSeconds: 10
    timeoutSeconds: 5
    failureThreshold: 6
  readinessProbe:
    exec:
      command: ["python3", "-c", "import urllib.request as u; u.urlopen('http://localhost:52365/api/local_raylet_healthz', timeout=3)"]
    initialDelaySeconds: 10
    periodSeconds: 5
    timeoutSeconds: 5
    failureThreshold: 10
  volumeMounts:
    - {name: tmp, mountPath: /tmp}
    - {name: workspace, mountPath: /workspace}
    - {name: models, mountPath: /models}
    {{- with .extraMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}

{{/* NetworkPolicy peers ------------------------------------------------------------------- */}}
{{- define "lmforge.peerRelease" -}}
- podSelector:
    matchLabels:
      app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- define "lmforge.peerKfp" -}}
- namespaceSelector:
    matchLabels:
      kubernetes.io/metadata.name: {{ .Values.networkPolicy.kfpNamespace }}
{{- end -}}
{{- define "lmforge.peerMonitoring" -}}
- namespaceSelector:
    matchLabels:
      kubernetes.io/metadata.name: {{ .Values.networkPolicy.monitoringNamespace }}
{{- end -}}

{{/* The vllm backend's init container: resolve models:/NAME@ALIAS in MLflow, download the version's
     model directory into /models and point /models/current at it (argv[1] = the model URI). */}}
{{- define "lmforge.fetchModelScript" -}}
import os, sys
from lmforge.registry import RegistryClient
client = RegistryClient()
path = client.download(client.resolve(sys.argv[1]), "/models")
link = "/models/.current"
if os.path.lexists(link):
    os.remove(link)
os.symlink(path, link)
os.replace(link, "/models/current")
print(sys.argv[1], "->", path)
{{- end -}}
