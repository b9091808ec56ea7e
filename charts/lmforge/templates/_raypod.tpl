{{/* The pod template of a Ray node group (head or workers) running the project image.
     Arguments: root, component (serving|training), name (ray-head|ray-worker), resources, gpus,
     ports, extraMounts, extraVolumes, initContainers, nodeSelector, tolerations. */}}
{{- define "lmforge.rayPodTemplate" -}}
{{- $root := .root -}}
metadata:
  labels:
    {{- include "lmforge.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    lmforge.io/ray: "true"
spec:
  # No serviceAccountName: KubeRay gives the head the account its autoscaler needs.
  securityContext:
    {{- include "lmforge.podSecurityContext" (dict "uid" 10001) | nindent 4 }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .initContainers }}
  initContainers:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    {{- include "lmforge.rayContainer" . | nindent 4 }}
  volumes:
    - name: tmp
      emptyDir: {}
    - name: workspace
      emptyDir: {}
    - name: models
      emptyDir:
        sizeLimit: {{ .cacheSize }}
    {{- with .extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}
