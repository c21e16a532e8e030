{{/* Names and labels. */}}
{{- define "baton.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "baton.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A component's object name: <fullname>-<component>, within the 63 characters of a DNS label. */}}
{{- define "baton.componentName" -}}
{{- printf "%s-%s" (include "baton.fullname" .root | trunc (int (sub 62 (len .component))) | trimSuffix "-") .component -}}
{{- end -}}

{{- define "baton.selectorLabels" -}}
app.kubernetes.io/name: {{ include "baton.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "baton.labels" -}}
{{ include "baton.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: baton
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "baton.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "baton.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* An image reference: by digest when one is given (immutable), else by tag. */}}
{{- define "baton.imageRef" -}}
{{- if .digest -}}
{{- printf "%s@%s" .repository .digest -}}
{{- else -}}
{{- printf "%s:%s" .repository (toString .tag) -}}
{{- end -}}
{{- end -}}

{{- define "baton.image" -}}
{{- $img := .Values.image -}}
{{- include "baton.imageRef" (dict "repository" $img.repository "digest" $img.digest "tag" (default .Chart.AppVersion $img.tag)) -}}
{{- end -}}

{{/* The Redis URL written into the config files. A URL from a Secret (it may hold a password) is not written
there: BATON_REDIS_URL from the Secret sets it, and environment variables override the config file. */}}
{{- define "baton.redisUrl" -}}
{{- if .Values.redis.bundled -}}
{{- printf "redis://%s:%d/0" (include "baton.componentName" (dict "root" . "component" "redis")) (int .Values.redis.port) -}}
{{- else if not .Values.redis.urlSecret.name -}}
{{- required "redis.bundled is false: set redis.url or redis.urlSecret.name" .Values.redis.url -}}
{{- end -}}
{{- end -}}

{{- define "baton.redisUrlEnv" -}}
{{- if and (not .Values.redis.bundled) .Values.redis.urlSecret.name }}
- name: BATON_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.urlSecret.name }}
      key: {{ .Values.redis.urlSecret.key }}
{{- end }}
{{- end -}}

{{/* Seconds the kubelet waits after SIGTERM: the process's drain grace plus a margin (and any preStop sleep). */}}
{{- define "baton.terminationGrace" -}}
{{- add (int .root.Values.cluster.drainGraceSeconds) (int .root.Values.cluster.terminationMarginSeconds) (int (default 0 .preStop)) -}}
{{- end -}}

{{/* The grpc.health.v1 service a role's readiness probe asks about: the API the process serves. */}}
{{- define "baton.apiService" -}}
{{- index (dict "decode" "baton.v1.Inference" "prefill" "baton.v1.Prefill" "router" "baton.v1.Inference") . -}}
{{- end -}}

{{/* "true" when a role's gRPC port speaks TLS: the router's with gateway.tls (its public port), the pods' with
internalTLS. Kubelet's gRPC probes speak plaintext only (and present no client certificate), so such a process
also serves grpc.health.v1 on a plaintext health port (health_port) and is probed there. */}}
{{- define "baton.healthPortOn" -}}
{{- if eq .role "router" -}}
{{- if .root.Values.gateway.tls.enabled }}true{{ end -}}
{{- else if .root.Values.internalTLS.enabled }}true{{ end -}}
{{- end -}}

{{/* Where the internal TLS Secret (tls.crt, tls.key, ca.crt) is mounted in every process. */}}
{{- define "baton.internalTLSDir" -}}/etc/baton/internal-tls{{- end -}}

{{- define "baton.internalTLSSecret" -}}
{{- .Values.internalTLS.existingSecret | default (include "baton.componentName" (dict "root" . "component" "internal-tls")) -}}
{{- end -}}

{{- define "baton.internalTLSVolume" -}}
{{- if .Values.internalTLS.enabled }}
- name: internal-tls
  secret:
    secretName: {{ include "baton.internalTLSSecret" . }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{- define "baton.internalTLSMount" -}}
{{- if .Values.internalTLS.enabled }}
- name: internal-tls
  mountPath: {{ include "baton.internalTLSDir" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* A checksum of the internal TLS Secret the chart makes: the processes read their certificates at start, so new
ones roll the pods. (An existing Secret's rotation needs a rollout restart, or a reloader.) */}}
{{- define "baton.internalTLSChecksum" -}}
{{- $t := .Values.internalTLS -}}
{{- if and $t.enabled (not $t.existingSecret) }}
checksum/internal-tls: {{ print $t.cert $t.key $t.ca | sha256sum }}
{{- end }}
{{- end -}}

{{/* A native gRPC probe (grpc.health.v1) with the timings of one probe kind. */}}
{{- define "baton.grpcProbe" -}}
grpc:
  port: {{ .port }}
  service: {{ .service | quote }}
periodSeconds: {{ .timing.periodSeconds }}
failureThreshold: {{ .timing.failureThreshold }}
timeoutSeconds: {{ .timing.timeoutSeconds }}
{{- end -}}

{{/* Read-only model volume, when there is one. */}}
{{- define "baton.modelVolume" -}}
{{- $v := .Values.model.volume -}}
{{- if eq $v.type "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ required "model.volume.claimName is required for type pvc" $v.claimName }}
    readOnly: true
{{- else if eq $v.type "hostPath" }}
- name: model
  hostPath:
    path: {{ required "model.volume.hostPath is required for type hostPath" $v.hostPath }}
    type: Directory
{{- end }}
{{- end -}}

{{- define "baton.modelMount" -}}
{{- if ne .Values.model.volume.type "none" }}
- name: model
  mountPath: {{ .Values.model.volume.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* Settings every process's config file starts from. */}}
{{- define "baton.commonConfig" -}}
host: "0.0.0.0"
model: {{ .Values.model.name | quote }}
tokenizer: {{ .Values.model.tokenizer | quote }}
served_model_name: {{ .Values.model.servedModelName | quote }}
redis_url: {{ include "baton.redisUrl" . | quote }}
redis_namespace: {{ .Values.cluster.redisNamespace | quote }}
drain_grace_s: {{ .Values.cluster.drainGraceSeconds }}
{{- end -}}

{{/* The restricted container security context, and what RDMA adds to it for the GPU pods. */}}
{{- define "baton.containerSecurityContext" -}}
{{- $rdma := and .gpu .root.Values.rdma.enabled -}}
{{- if and $rdma .root.Values.rdma.hostDevices }}
privileged: true
{{- else }}
allowPrivilegeEscalation: false
{{- end }}
readOnlyRootFilesystem: true
{{- if and $rdma .root.Values.rdma.ipcLock }}
runAsNonRoot: false
runAsUser: 0
runAsGroup: 0
{{- else }}
runAsNonRoot: true
runAsUser: {{ .root.Values.securityContext.runAsUser }}
runAsGroup: {{ .root.Values.securityContext.runAsGroup }}
{{- end }}
capabilities:
  drop: ["ALL"]
  {{- if and $rdma .root.Values.rdma.ipcLock }}
  add: ["IPC_LOCK"]
  {{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Annotations that skip checkov findings a setting makes unavoidable, one per "CHECK_ID=reason" in the list. */}}
{{- define "baton.checkovSkips" -}}
{{- with . -}}
annotations:
  {{- range $i, $s := . }}
  checkov.io/skip{{ add1 $i }}: {{ $s | quote }}
  {{- end }}
{{- end -}}
{{- end -}}

{{- define "baton.redisSecretSkip" -}}
CKV_K8S_35=redis.urlSecret: Baton takes the Redis URL from flags, BATON_REDIS_URL or its config file, not a file
{{- end -}}

{{/* One process's config file (role: decode, prefill or router), as YAML. Pods carry a checksum of their own
role's file only, so a router setting does not restart (and reload) the GPU pods. */}}
{{- define "baton.config" -}}
{{- $common := include "baton.commonConfig" .root | fromYaml -}}
{{- $transfer := dict "transfer_protocol" (ternary "rdma" "tcp" .root.Values.rdma.enabled) "transfer_device_names" .root.Values.rdma.deviceNames "transfer_timeout_s" .root.Values.transfer.timeoutSeconds "transfer_metadata_server" .root.Values.transfer.metadataServer -}}
{{- $decodeFixed := dict "port" .root.Values.decode.port "metrics_port" .root.Values.decode.metricsPort -}}
{{- $prefillFixed := dict "port" .root.Values.prefill.port "metrics_port" .root.Values.prefill.metricsPort -}}
{{- $engine := mergeOverwrite (dict "load_format" .root.Values.model.loadFormat) (deepCopy .root.Values.engine) -}}
{{- $routerFixed := dict "port" .root.Values.router.port "http_port" .root.Values.router.httpPort "metrics_port" .root.Values.router.metricsPort "page_size" (index .root.Values.engine "page_size" | default 16) -}}
{{- if or .root.Values.gateway.apiKeys.keys .root.Values.gateway.apiKeys.existingSecret }}
{{- $_ := set $routerFixed "api_key_file" (printf "/etc/baton/api-keys/%s" .root.Values.gateway.apiKeys.secretKey) }}
{{- end }}
{{- if .root.Values.gateway.tls.enabled }}
{{- $_ := set $routerFixed "tls_cert_file" "/etc/baton/tls/tls.crt" }}
{{- $_ := set $routerFixed "tls_key_file" "/etc/baton/tls/tls.key" }}
{{- end }}
{{- /* Internal TLS: every process gets the certificate (a pod serves with it; every process presents it as its
client certificate), the CA (to verify the pods it calls) and the server name; the pods, whose gRPC ports are the
internal ones, also whether callers need a certificate. Probes go to the health port of a TLS port. */}}
{{- $itls := .root.Values.internalTLS -}}
{{- range $fixed := list $decodeFixed $prefillFixed $routerFixed }}
{{- if $itls.enabled }}
{{- $dir := include "baton.internalTLSDir" $.root }}
{{- $_ := set $fixed "internal_tls_cert_file" (printf "%s/tls.crt" $dir) }}
{{- $_ := set $fixed "internal_tls_key_file" (printf "%s/tls.key" $dir) }}
{{- $_ := set $fixed "internal_tls_ca_file" (printf "%s/ca.crt" $dir) }}
{{- $_ := set $fixed "internal_tls_server_name" $itls.serverName }}
{{- end }}
{{- end }}
{{- if $itls.enabled }}
{{- $_ := set $decodeFixed "internal_tls_require_client_cert" $itls.requireClientCert }}
{{- $_ := set $prefillFixed "internal_tls_require_client_cert" $itls.requireClientCert }}
{{- end }}
{{- $_ := set $decodeFixed "health_port" (ternary .root.Values.decode.healthPort -1 (eq (include "baton.healthPortOn" (dict "root" .root "role" "decode")) "true")) }}
{{- $_ := set $prefillFixed "health_port" (ternary .root.Values.prefill.healthPort -1 (eq (include "baton.healthPortOn" (dict "root" .root "role" "prefill")) "true")) }}
{{- $_ := set $routerFixed "health_port" (ternary .root.Values.router.healthPort -1 (eq (include "baton.healthPortOn" (dict "root" .root "role" "router")) "true")) }}
{{- /* What the chart owns cannot come from a role's config: the probes and mounts would disagree with it. */}}
{{- range $role := list "decode" "prefill" "router" }}
{{- range $key, $_ := index $.root.Values $role "config" }}
{{- if or (hasPrefix "internal_tls_" $key) (eq $key "health_port") }}
{{- fail (printf "%s.config.%s: set internalTLS.* (and %s.healthPort) instead; the chart derives it" $role $key $role) }}
{{- end }}
{{- end }}
{{- end }}
{{- $router := mergeOverwrite (deepCopy $common) (deepCopy .root.Values.router.config) $routerFixed -}}
{{- $decode := mergeOverwrite (deepCopy $common) (deepCopy $engine) (deepCopy $transfer) (deepCopy .root.Values.decode.config) $decodeFixed -}}
{{- $prefill := mergeOverwrite (deepCopy $common) (deepCopy $engine) (deepCopy $transfer) (deepCopy .root.Values.prefill.config) $prefillFixed -}}
{{- toYaml (index (dict "decode" $decode "prefill" $prefill "router" $router) .role) -}}
{{- end -}}
