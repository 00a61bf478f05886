{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "ragtune.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects: the release name, prefixed with the chart name unless it already contains it. */}}
{{- define "ragtune.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "ragtune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ragtune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "ragtune.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "ragtune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ragtune
{{- end }}

{{- define "ragtune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ragtune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository[:tag][@digest] — a digest pins the image; the tag defaults to appVersion. */}}
{{- define "ragtune.imageRef" -}}
{{- $img := index . 0 }}{{- $root := index . 1 }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository (default $root.Chart.AppVersion $img.tag) }}
{{- end }}
{{- end }}

{{/* Namespaces watched in namespaced mode (default: the release namespace), de-duplicated. */}}
{{- define "ragtune.watchNamespaces" -}}
{{- $ns := .Values.watch.namespaces | default (list .Release.Namespace) }}
{{- join "," (uniq $ns) }}
{{- end }}

{{/*
The operator's permissions in a watched namespace: exactly the API calls its code makes (see the
README's permission table; tests/security/permissions.py is the same list and the tests compare
the chart, the API calls the operator makes (recorded) and that list). No Secrets: pods get credentials through
secretKeyRef, the operator never reads them. No cluster-wide rules even in cluster mode: kopf
runs with peering and cluster scanning off.
*/}}
{{- define "ragtune.namespacedRules" -}}
# FineTuneJobs: watched (kopf); read by AdapterDeployments that reference them.
- apiGroups: ["ragtune.dev"]
  resources: ["finetunejobs"]
  verbs: ["get", "list", "watch"]
# AdapterDeployments: watched; kopf patches its finalizer and progress annotations.
- apiGroups: ["ragtune.dev"]
  resources: ["adapterdeployments"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["ragtune.dev"]
  resources: ["finetunejobs/status", "adapterdeployments/status"]
  verbs: ["patch"]
# Children carry ownerReferences with blockOwnerDeletion; clusters running the
# OwnerReferencesPermissionEnforcement admission plugin (e.g. OpenShift) require this for it.
- apiGroups: ["ragtune.dev"]
  resources: ["finetunejobs/finalizers", "adapterdeployments/finalizers"]
  verbs: ["update"]
# Training Jobs and the AdapterDeployment's online-evaluation Jobs.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["create", "get", "list", "watch", "patch", "delete"]
# Pod status explains failures (missing Secret, image pull, unschedulable) and carries the
# trainer's termination message; TGI pods are checked during a rollout.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# Training progress lines are sampled from the trainer pod's log.
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
# TGI server and canary (AdapterDeployment); `update` replaces the pod template in one write.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["create", "get", "update", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create", "get", "delete"]
# The PodDisruptionBudget of an AdapterDeployment's stable server (replicas > 1); `update`: a new
# replica count or backend.
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["create", "get", "update", "delete"]
# The desired-set ConfigMap of a vLLM server (its sidecars load the set from it): only ConfigMaps
# the operator creates; never a Secret.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["create", "get", "update", "delete"]
# The HTTPRoute of a `strategy.type: Canary` AdapterDeployment (weights of stable vs canary);
# never its status (the Gateway writes that), no other Gateway API object.
- apiGroups: ["gateway.networking.k8s.io"]
  resources: ["httproutes"]
  verbs: ["create", "get", "update", "delete"]
# Kueue's Workloads, read (listed) only while a FineTuneJob with spec.queueName waits: why it waits.
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["list"]
# Events on every transition.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}
