{{- define "collm.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "collm.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "collm.labels" -}}
{{ include "collm.selectorLabels" . }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: collm
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "collm.serviceAccountName" -}}
{{- default (include "collm.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* What the operator does to a CollmCluster's children and to the collm.io resources. */}}
{{- define "collm.workloadRules" -}}
- apiGroups: ["collm.io"]
  resources: ["collmclusters", "adapterrounds"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
- apiGroups: ["collm.io"]
  resources: ["collmclusters/status", "adapterrounds/status"]
  verbs: ["get", "update", "patch"]
- apiGroups: ["collm.io"]
  # blockOwnerDeletion on the children's ownerReferences needs update on the owner's finalizers.
  resources: ["collmclusters/finalizers", "adapterrounds/finalizers"]
  verbs: ["update"]
- apiGroups: ["apps"]
  resources: ["statefulsets", "deployments"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
- apiGroups: [""]
  resources: ["services", "configmaps", "serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
- apiGroups: ["monitoring.coreos.com"]
  resources: ["servicemonitors"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}
