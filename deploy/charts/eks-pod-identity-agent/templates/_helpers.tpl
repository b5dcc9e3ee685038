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

{{/*
The image: image.override, else [<containerRegistry>/]<repository>:<tag or appVersion>. No default: this
agent's image is in no public registry. An original values file names AWS's Go agent with
containerRegistry and tag alone (its chart renders <containerRegistry>/eks/eks-pod-identity-agent:<tag>);
rendering that here would give a reference that exists nowhere, and every node would sit in
ImagePullBackOff without saying why. So without override or repository, rendering fails and says what to
set.
*/}}
{{- define "eks-pod-identity-agent.image" -}}
{{- $image := .Values.image -}}
{{- if $image.override -}}
{{- $image.override -}}
{{- else if $image.repository -}}
{{- $repository := $image.repository -}}
{{- if $image.containerRegistry -}}
{{- $repository = printf "%s/%s" (trimSuffix "/" $image.containerRegistry) $repository -}}
{{- end -}}
{{- printf "%s:%s" $repository ($image.tag | default .Chart.AppVersion | toString) -}}
{{- else -}}
{{- $theirs := "" -}}
{{- if $image.containerRegistry -}}
{{- $theirs = printf " image.containerRegistry %q and image.tag %q name AWS's Go agent in the original chart (%s/eks/eks-pod-identity-agent:%s), not this image." $image.containerRegistry ($image.tag | toString) $image.containerRegistry ($image.tag | toString) -}}
{{- end -}}
{{- fail (printf "set image.override to this agent's image in your registry (e.g. --set image.override=111122223333.dkr.ecr.us-west-2.amazonaws.com/eks-pod-identity-agent:%s; deploy/README.md, \"Push the image to your registry\"), or image.repository (and image.tag): no image of this agent is named.%s" .Chart.AppVersion $theirs) -}}
{{- end -}}
{{- end -}}

{{/*
Defaults of values whose key is unset (null) in values.yaml: kept here, not there, because Helm merges a
user's map into the chart's map, so that a user's `{}` could never clear a default given in values.yaml.
Absent from the values (or null): the default. `{}`: nothing. A map: merged into the default, the user's
keys winning, as Helm would have merged it into values.yaml's.
Context: dict "values" (a map), "key", "default" (the default, as a YAML string).
*/}}
{{- define "eks-pod-identity-agent.valueOrDefault" -}}
{{- $default := .default | fromYaml -}}
{{- if not (hasKey .values .key) -}}
{{- toYaml $default -}}
{{- else -}}
{{- with index .values .key -}}
{{- $merged := mergeOverwrite $default (deepCopy .) -}}
{{- /* A key set to null drops the default's (e.g. resources.limits: null), as in Helm's values. */ -}}
{{- range $name, $value := $merged }}{{ if kindIs "invalid" $value }}{{ $_ := unset $merged $name }}{{ end }}{{ end -}}
{{- toYaml $merged -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Every Linux node (amd64, arm64) but Fargate, hybrid and EKS Auto Mode nodes (Auto Mode runs its own agent). */}}
{{- define "eks-pod-identity-agent.defaultAffinity" -}}
nodeAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    nodeSelectorTerms:
      - matchExpressions:
          - key: "kubernetes.io/os"
            operator: In
            values:
              - linux
          - key: "kubernetes.io/arch"
            operator: In
            values:
              - amd64
              - arm64
          - key: "eks.amazonaws.com/compute-type"
            operator: NotIn
            values:
              - fargate
              - hybrid
              - auto
{{- end -}}

{{/* The server container's: the credential cache (--max-cache-size 2000), the audit queue and the eBPF
maps (charged to the pod's memory cgroup on 5.11+ kernels) fit in 128Mi. */}}
{{- define "eks-pod-identity-agent.defaultResources" -}}
requests:
  cpu: 25m
  memory: 32Mi
limits:
  memory: 128Mi
{{- end -}}

{{/* As in the original chart, for a Prometheus that discovers pods by annotation. */}}
{{- define "eks-pod-identity-agent.defaultPodAnnotations" -}}
prometheus.io/port: {{ .Values.metrics.port | toString | quote }}
prometheus.io/scrape: "true"
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
