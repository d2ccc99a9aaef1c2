{{/* The image reference of every part. */}}
{{- define "oneagent-csi.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* imagePullPolicy and imagePullSecrets lines, when set. */}}
{{- define "oneagent-csi.pullPolicy" -}}
{{- with .Values.image.pullPolicy }}
imagePullPolicy: {{ . }}
{{- end }}
{{- end }}

{{- define "oneagent-csi.pullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets: {{ toJson . }}
{{- end }}
{{- end }}

{{/* The tokens Secret's name. */}}
{{- define "oneagent-csi.tokensSecret" -}}
{{ .Values.tokens.existingSecret | default "oneagent-csi-tokens" }}
{{- end }}

{{/* The node config file: node.config with the tenants. */}}
{{- define "oneagent-csi.nodeConfig" -}}
{{- $tenants := list }}
{{- range .Values.tenants }}
{{- $t := dict "name" .name "version" (.version | default "latest") }}
{{- if .apiURL }}{{ $_ := set $t "apiURL" .apiURL }}{{ $_ := set $t "tokenFile" (printf "/etc/oneagent-csi/tokens/%s" .name) }}{{ end }}
{{- if .caPEM }}{{ $_ := set $t "caFile" (printf "/etc/oneagent-csi/tokens/%s-ca.pem" .name) }}{{ end }}
{{- if .pullSecret }}{{ $_ := set $t "pullSecretFile" (printf "/etc/oneagent-csi/tokens/%s-pull.json" .name) }}{{ end }}
{{- range $k, $v := . }}
{{- if has $k (list "flavor" "proxy" "namespaces" "versionPins" "maxPinnedVersions" "allowWritable" "writableSize" "image" "mirrors" "imagePath") }}{{ $_ := set $t $k $v }}{{ end }}
{{- end }}
{{- $tenants = append $tenants $t }}
{{- end }}
{{- toYaml (merge (dict "tenants" $tenants) .Values.node.config) }}
{{- end }}

{{/* The namespaces the webhook never sends: the ignored ones and ours. */}}
{{- define "oneagent-csi.ignoredNamespaces" -}}
{{ toJson (append .Values.injector.ignoredNamespaces .Release.Namespace) }}
{{- end }}
