{{/* Chart name, or nameOverride. */}}
{{- define "understudy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name for the release's resources: fullnameOverride, else the release name
if it already contains the chart name, else "<release>-<name>". At most 63
characters (DNS label).
*/}}
{{- define "understudy.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<chart>-<version>" for the helm.sh/chart label. */}}
{{- define "understudy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: stable for the life of a release (never add to them). */}}
{{- define "understudy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "understudy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Kubernetes recommended labels, on every resource of the chart. */}}
{{- define "understudy.labels" -}}
helm.sh/chart: {{ include "understudy.chart" . }}
{{ include "understudy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: understudy
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Image tag: image.tag, else the chart's appVersion. */}}
{{- define "understudy.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{/* The ServiceAccount the operator runs as. */}}
{{- define "understudy.serviceAccountName" -}}
{{- default (include "understudy.fullname" .) .Values.serviceAccount.name }}
{{- end }}

{{/* Name of the leader-election Lease. */}}
{{- define "understudy.leaderElectionId" -}}
{{- default (include "understudy.fullname" .) .Values.leaderElection.id }}
{{- end }}

{{/*
Checks across values that the JSON schema cannot express; included by the
Deployment so that every render runs them.
*/}}
{{- define "understudy.validate" -}}
{{- if and (not .Values.agentTLS.insecure) (not .Values.agentTLS.secretName) }}
{{- fail "agentTLS.secretName is required: name a kubernetes.io/tls Secret (tls.crt, tls.key and ca.crt) with the operator's client certificate for the agents (CN understudy-operator). Only for loopback test setups: --set agentTLS.insecure=true" }}
{{- end }}
{{- if and .Values.agentTLS.insecure .Values.agentTLS.secretName }}
{{- fail "agentTLS.insecure=true and agentTLS.secretName are exclusive: unset one of them" }}
{{- end }}
{{- if and (not .Values.leaderElection.enabled) (gt (int .Values.replicaCount) 1) }}
{{- fail (printf "leaderElection.enabled=false needs replicaCount 0 or 1 (it is %d): several replicas without leader election would all reconcile the same pairs" (int .Values.replicaCount)) }}
{{- end }}
{{- if and .Values.provisioning.enabled (or (not .Values.provisioning.caSecretName) (not .Values.provisioning.enrollURL)) }}
{{- fail "provisioning.enabled needs provisioning.caSecretName (a Secret with the agents' ca.crt and ca.key) and provisioning.enrollURL (the https URL instances reach the enrollment endpoint at)" }}
{{- end }}
{{- if and .Values.metrics.enabled (eq (int .Values.metrics.port) (int .Values.health.port)) }}
{{- fail (printf "metrics.port and health.port must differ (both are %d)" (int .Values.health.port)) }}
{{- end }}
{{- end }}
