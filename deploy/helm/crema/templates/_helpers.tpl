{{- define "crema.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}{{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}{{ end }}
{{- end -}}

{{- define "crema.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "crema.labels" -}}
{{ include "crema.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "crema.image" -}}
{{- $image := ternary .Values.image.gpu .Values.image.cpu (.Values.gpu | default false) -}}
{{ printf "%s:%s" $image.repository $image.tag }}
{{- end -}}

{{/* The pipeline's models other than the ensemble, as a PromQL regex (names are [A-Za-z0-9_-]). */}}
{{- define "crema.queueModels" -}}
{{ without .Values.models .Values.ensemble | join "|" }}
{{- end -}}
