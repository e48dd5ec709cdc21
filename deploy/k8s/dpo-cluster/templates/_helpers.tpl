{{/* Names. */}}
{{- define "dpo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dpo.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "dpo.coordinator" -}}{{ include "dpo.fullname" . }}-coordinator{{- end -}}
{{- define "dpo.worker" -}}{{ include "dpo.fullname" . }}-worker{{- end -}}
{{- define "dpo.etcd" -}}{{ include "dpo.fullname" . }}-etcd{{- end -}}
{{- define "dpo.tokenSecret" -}}{{ .Values.auth.existingSecret | default (printf "%s-token" (include "dpo.fullname" .)) }}{{- end -}}
{{- define "dpo.tlsSecret" -}}{{ .Values.tls.existingSecret | default (printf "%s-tls" (include "dpo.fullname" .)) }}{{- end -}}
{{- define "dpo.sharedClaim" -}}{{ .Values.shared.existingClaim | default (printf "%s-shared" (include "dpo.fullname" .)) }}{{- end -}}

{{/* Labels. */}}
{{- define "dpo.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "dpo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "dpo.selector" -}}
app.kubernetes.io/name: {{ include "dpo.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "dpo.image" -}}
{{- $img := index .root.Values.image .which -}}
{{ $img.repository }}:{{ $img.tag | default .root.Chart.AppVersion }}
{{- end -}}

{{/* The store the coordinator uses: etcd (bundled or external) or embedded. */}}
{{- define "dpo.etcdEndpoints" -}}
{{- if .Values.etcd.enabled -}}
{{- $scheme := ternary "https" "http" .Values.tls.enabled -}}
{{- $eps := list -}}
{{- range $i := until (int .Values.etcd.replicas) -}}
{{- $eps = append $eps (printf "%s://%s-%d.%s-peers.%s.svc.%s:2379" $scheme (include "dpo.etcd" $) $i (include "dpo.etcd" $) $.Release.Namespace $.Values.clusterDomain) -}}
{{- end -}}
{{- join "," $eps -}}
{{- else -}}
{{- join "," .Values.etcd.external.endpoints -}}
{{- end -}}
{{- end -}}

{{/* A restricted container security context (non-root, nothing extra). */}}
{{- define "dpo.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end -}}
