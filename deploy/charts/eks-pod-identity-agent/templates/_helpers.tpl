{{/*
Names and labels follow the original chart exactly: the DaemonSets' names and selectors must not change,
so that an upgrade from it replaces them in place (selectors are immutable). The context is the root, or
a dict with Values, Release, Chart and nameSuffix (a DaemonSet's suffix).
*/}}

{{/* "<name>" or "<name>-<suffix>", at most 63 characters. */}}
{{- define "eks-pod-identity-agent.withSuffix" -}}
{{- if .suffix -}}
{{- printf "%s-%s" (.name | trunc (int (sub 62 (len .suffix))) | trimSuffix "-") .suffix -}}
{{- else -}}
{{- .name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* app.kubernetes.io/name: nameOverride (or the chart's name), plus the DaemonSet's suffix. */}}
{{- define "eks-pod-identity-agent.name" -}}
{{- include "eks-pod-identity-agent.withSuffix" (dict "name" (default .Chart.Name .Values.nameOverride) "suffix" .nameSuffix) -}}
{{- end -}}

{{/* Object names: fullnameOverride, else the release name (if it contains the name) or
"<release>-<name>"; plus the DaemonSet's suffix. */}}
{{- define "eks-pod-identity-agent.fullname" -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if .Values.fullnameOverride -}}
{{- $name = .Values.fullnameOverride -}}
{{- else if contains $name .Release.Name -}}
{{- $name = .Release.Name -}}
{{- else -}}
{{- $name = printf "%s-%s" .Release.Name $name -}}
{{- end -}}
{{- include "eks-pod-identity-agent.withSuffix" (dict "name" $name "suffix" .nameSuffix) -}}
{{- end -}}

{{- define "eks-pod-identity-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "eks-pod-identity-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "eks-pod-identity-agent.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "eks-pod-identity-agent.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app: eks-pod-identity-agent
{{- end -}}

{{/* On the pods of every DaemonSet of the release (the selector labels differ per DaemonSet): what the
metrics Service and the PodMonitor select. */}}
{{- define "eks-pod-identity-agent.releasePodLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
{{ include "eks-pod-identity-agent.partOfLabel" . }}
{{- end -}}

{{- define "eks-pod-identity-agent.partOfLabel" -}}
app.kubernetes.io/part-of: {{ include "eks-pod-identity-agent.fullname" (dict "Values" .Values "Release" .Release "Chart" .Chart) }}
{{- end -}}

{{/* image.override, else <containerRegistry>/<repository>:<tag or appVersion>. */}}
{{- define "eks-pod-identity-agent.image" -}}
{{- if .Values.image.override -}}
{{- .Values.image.override -}}
{{- else -}}
{{- $repository := .Values.image.repository -}}
{{- if .Values.image.containerRegistry -}}
{{- $repository = printf "%s/%s" .Values.image.containerRegistry $repository -}}
{{- end -}}
{{- printf "%s:%s" $repository (.Values.image.tag | default .Chart.AppVersion | toString) -}}
{{- end -}}
{{- end -}}

{{/*
A container's securityContext: not privileged, no privilege escalation, read-only root filesystem, uid 0,
every capability dropped but the named ones (each with its reason as a comment), the seccomp profile.
A key of `extra` (a DaemonSet's additionalSecurityContext) replaces ours.
Context: dict "capabilities" (name → why) "seccompProfile" "extra".
*/}}
{{- define "eks-pod-identity-agent.securityContext" -}}
{{- $extra := .extra | default dict -}}
{{- if not (hasKey $extra "privileged") }}
privileged: false
{{- end }}
{{- if not (hasKey $extra "allowPrivilegeEscalation") }}
allowPrivilegeEscalation: false
{{- end }}
{{- if not (hasKey $extra "readOnlyRootFilesystem") }}
readOnlyRootFilesystem: true
{{- end }}
{{- if not (hasKey $extra "runAsUser") }}
# uid 0 without privileges: Kubernetes grants added capabilities only to uid 0 (it sets no ambient
# capabilities), and the node files read here (cgroup tree, hybrid nodes' .aws) belong to root.
runAsUser: 0
{{- end }}
{{- if not (hasKey $extra "capabilities") }}
capabilities:
  drop:
    - ALL
  {{- with .capabilities }}
  add:
    {{- range $name, $why := . }}
    - {{ $name }}  # {{ $why | toString | replace "\n" " " }}
    {{- end }}
  {{- end }}
{{- end }}
{{- if and .seccompProfile (not (hasKey $extra "seccompProfile")) }}
seccompProfile:
  {{- toYaml .seccompProfile | nindent 2 }}
{{- end }}
{{- with $extra }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Scrape relabeling: a `node` label with the pod's node, for per-node panels and alerts (instance is
the node's IP: the agent runs on the host network). */}}
{{- define "eks-pod-identity-agent.nodeRelabeling" -}}
relabelings:
  - sourceLabels: [__meta_kubernetes_pod_node_name]
    targetLabel: node
{{- end -}}

{{/* The ServiceAccount of the Kubernetes API features: serviceAccount.name, else the full name. */}}
{{- define "eks-pod-identity-agent.serviceAccountName" -}}
{{- .Values.serviceAccount.name | default (include "eks-pod-identity-agent.fullname" (dict "Values" .Values "Release" .Release "Chart" .Chart)) -}}
{{- end -}}
