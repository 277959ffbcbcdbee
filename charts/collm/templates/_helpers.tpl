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
  # watch: kopf; create/delete: scheduled rounds and their history; patch: kopf's bookkeeping, round labels.
  resources: ["collmclusters", "adapterrounds"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["collm.io"]
  resources: ["collmclusters/status", "adapterrounds/status"]
  verbs: ["patch"]
- apiGroups: ["collm.io"]
  # blockOwnerDeletion on the children's ownerReferences needs update on the owner's finalizers.
  resources: ["collmclusters/finalizers"]
  verbs: ["update"]
- apiGroups: ["apps"]
  # watch: the control loop reads its clusters' workloads from kopf indexes fed by watches
  resources: ["statefulsets", "deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  # secrets: each cluster's TLS certificates and admin token, and (in the operator's namespace) the CA
  resources: ["services", "configmaps", "serviceaccounts", "secrets"]
  verbs: ["get", "list", "create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "create", "patch", "delete"]
- apiGroups: ["monitoring.coreos.com"]
  resources: ["servicemonitors"]
  verbs: ["get", "list", "create", "patch", "delete"]
- apiGroups: [""]
  # the agents' and routers' pod IPs and readiness (watched into a kopf index)
  resources: ["pods"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}
