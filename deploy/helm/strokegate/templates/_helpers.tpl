{{- define "strokegate.labels" -}}
app.kubernetes.io/name: strokegate
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: strokegate
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "strokegate.selector" -}}
app.kubernetes.io/name: strokegate
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "strokegate.podSecurity" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "strokegate.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{- define "strokegate.dataVolumes" -}}
- name: spool
  persistentVolumeClaim:
    claimName: {{ .Release.Name }}-spool
- name: results
  persistentVolumeClaim:
    claimName: {{ .Release.Name }}-results
{{- end -}}
