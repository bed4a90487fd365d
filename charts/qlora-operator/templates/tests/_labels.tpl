{{/* Labels of the `helm test` objects: the release's labels without the Deployment's and the
metrics Service's selector (app.kubernetes.io/name + instance), so the test pod is never taken
for an operator replica or scraped as one. */}}
{{- define "qlora-operator.testLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: {{ include "qlora-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: helm-test
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "qlora-operator.testName" -}}
{{- printf "%s-test" (include "qlora-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The objects the test pod needs exist before it starts (lower weight) and are deleted once
it has finished, pass or fail: hooks are not part of the release, so `helm uninstall` would leave
them (a ClusterRole among them) behind. */}}
{{- define "qlora-operator.testSupportHook" -}}
helm.sh/hook: test
helm.sh/hook-weight: "-10"
helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded,hook-failed
{{- end }}
