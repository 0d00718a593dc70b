{{/* Common labels. Resource names are fixed (s3vol-*): a CSI driver is a cluster singleton. */}}
{{- define "s3vol.labels" -}}
app.kubernetes.io/name: s3vol
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: s3vol
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{/* Selector labels of one component: include with (list . "controller"). */}}
{{- define "s3vol.selectorLabels" -}}
app.kubernetes.io/name: s3vol
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "s3vol.componentLabels" -}}
{{ include "s3vol.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "s3vol.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* Directory of the driver's CSI socket on the host. */}}
{{- define "s3vol.pluginDir" -}}
{{ .Values.kubeletDir }}/plugins/{{ .Values.driverName }}
{{- end }}

{{/* Directory of the mounter socket on the host (same path inside both pods). */}}
{{- define "s3vol.mounterSocketDir" -}}
{{ include "s3vol.pluginDir" . }}/mounter
{{- end }}

{{/* Arguments shared by `s3vol csi` in the controller and the node plugin. */}}
{{- define "s3vol.csiArgs" -}}
- csi
- --endpoint=unix:///csi/csi.sock
- --node-id=$(NODE_NAME)
- --mode={{ .mode }}
- --driver-name={{ .root.Values.driverName }}
- --state-dir={{ .root.Values.node.stateDir }}
- --mounter-socket={{ include "s3vol.mounterSocketDir" .root }}/mounter.sock
- --log-level={{ .root.Values.logLevel }}
- --metrics-addr=0.0.0.0:{{ .metricsPort }}
{{- end }}

{{/* Environment shared by `s3vol csi` in the controller and the node plugin. */}}
{{- define "s3vol.csiEnv" -}}
{{- with .Values.s3.endpoint }}
- name: S3VOL_S3_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.region }}
- name: S3VOL_S3_REGION
  value: {{ . | quote }}
{{- end }}
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
{{- end }}

{{- define "s3vol.restrictedContainer" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end }}

{{- define "s3vol.nonRootPod" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
The service-account token, CA and namespace that automountServiceAccountToken would mount,
as a volume the pod declares explicitly, so that only the containers that call the API mount
it (apiAccessMount).
*/}}
{{- define "s3vol.apiAccessVolume" -}}
- name: kube-api-access
  projected:
    defaultMode: 0444
    sources:
      - serviceAccountToken:
          path: token
          expirationSeconds: 3607
      - configMap:
          name: kube-root-ca.crt
          items:
            - key: ca.crt
              path: ca.crt
      - downwardAPI:
          items:
            - path: namespace
              fieldRef:
                fieldPath: metadata.namespace
{{- end }}

{{- define "s3vol.apiAccessMount" -}}
- name: kube-api-access
  mountPath: /var/run/secrets/kubernetes.io/serviceaccount
  readOnly: true
{{- end }}
