{{/*
Names. The release name is the prefix of every object ("veer" for
`helm install veer ...`, giving the ServiceAccounts veer-agent and
veer-operator that the docs and tests use), unless fullnameOverride is set.
*/}}
{{- define "veer.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "veer.agent.name" -}}{{ include "veer.fullname" . }}-agent{{- end -}}
{{- define "veer.operator.name" -}}{{ include "veer.fullname" . }}-operator{{- end -}}
{{- define "veer.agent.serviceAccount" -}}{{ include "veer.agent.name" . }}{{- end -}}
{{- define "veer.operator.serviceAccount" -}}{{ include "veer.operator.name" . }}{{- end -}}

{{/* The image every container runs: one image for agent, operator and CLI. */}}
{{- define "veer.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* Labels of every object. app.kubernetes.io/name=veer plus a component is
what `kubectl veer` (deploy/kubectl-veer) selects agent pods by. */}}
{{- define "veer.labels" -}}
app.kubernetes.io/name: veer
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "veer.agent.selector" -}}
app.kubernetes.io/name: veer
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end -}}

{{- define "veer.operator.selector" -}}
app.kubernetes.io/name: veer
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* KUBERNETES_SERVICE_HOST/PORT: how the agent reaches the API server when no
kube-proxy serves the `kubernetes` Service address yet (a fresh node). */}}
{{- define "veer.apiServerEnv" -}}
{{- with .Values.kubernetes.apiServerHost }}
- name: KUBERNETES_SERVICE_HOST
  value: {{ . | quote }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ $.Values.kubernetes.apiServerPort | toString | quote }}
{{- end }}
{{- end -}}
