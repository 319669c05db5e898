{{/*
Labels of every object: the kustomize overlays' two (so selectors and tooling written for the
kustomize install keep working), Helm's standard ones, and commonLabels.
*/}}
{{- define "ray-operator.labels" -}}
app.kubernetes.io/name: ray-operator
app.kubernetes.io/component: operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "ray-operator.annotations" -}}
{{- with .Values.commonAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The metadata block of a namespaced object: name, release namespace, labels, annotations. */}}
{{- define "ray-operator.metadata" -}}
name: {{ .name }}
namespace: {{ .root.Release.Namespace }}
labels:
  {{- include "ray-operator.labels" .root | nindent 2 }}
{{- include "ray-operator.annotations" .root }}
{{- end }}

{{- define "ray-operator.clusterMetadata" -}}
name: {{ .name }}
labels:
  {{- include "ray-operator.labels" .root | nindent 2 }}
{{- include "ray-operator.annotations" .root }}
{{- end }}

{{/* Leader election rules: the same in both modes (the role.yaml of both kustomize overlays). */}}
{{- define "ray-operator.leaseRules" -}}
# Leader election. create cannot be limited by name; everything else only touches the operator's
# own Lease.
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["create"]
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  resourceNames: ["ray-operator-leader"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}

{{/* What the operator does to RayClusters and their children (pods' patch is added per mode). */}}
{{- define "ray-operator.clusterRules" -}}
- apiGroups: ["cluster.ray.io"]
  resources: ["rayclusters"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["cluster.ray.io"]
  resources: ["rayclusters/status"]
  verbs: ["patch"]
# ownerReferences with blockOwnerDeletion: true (OwnerReferencesPermissionEnforcement).
- apiGroups: ["cluster.ray.io"]
  resources: ["rayclusters/finalizers"]
  verbs: ["update"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "delete"{{ if eq .Values.mode "namespaced" }}, "patch"{{ end }}]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
