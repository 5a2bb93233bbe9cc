{{/* Chart name. */}}
{{- define "trainer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 50 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the objects: the Job, its headless Service and so the pods' DNS names. 50 characters at most:
a pod's host name is <job>-<index> and the ingest job's is <fullname>-ingest-<index>, 63 at most.
*/}}
{{- define "trainer.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "trainer.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "trainer.labels" -}}
helm.sh/chart: {{ include "trainer.chart" . }}
{{ include "trainer.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "trainer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "trainer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "trainer.ingestName" -}}
{{- include "trainer.fullname" . }}-ingest
{{- end }}

{{- define "trainer.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "trainer.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "trainer.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion (ternary "gpu" "cpu" (gt (int .Values.gpusPerWorker) 0))) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* The ingest never uses a GPU: the -cpu image unless ingest.image says otherwise. */}}
{{- define "trainer.ingestImage" -}}
{{- $repository := .Values.ingest.image.repository | default .Values.image.repository }}
{{- printf "%s:%s" $repository (.Values.ingest.image.tag | default (printf "%s-cpu" .Chart.AppVersion)) }}
{{- end }}

{{/* Horovod processes per worker pod: one per GPU, or one CPU process. */}}
{{- define "trainer.slots" -}}
{{- max 1 (int .Values.gpusPerWorker) }}
{{- end }}

{{/* The pod index the Job controller sets as an annotation, so that $(JOB_COMPLETION_INDEX) expands in args. */}}
{{- define "trainer.indexEnv" -}}
- name: JOB_COMPLETION_INDEX
  valueFrom:
    fieldRef:
      fieldPath: metadata.annotations['batch.kubernetes.io/job-completion-index']
{{- end }}

{{/* Object store access: credentials only by reference to an existing Secret. */}}
{{- define "trainer.storageEnv" -}}
{{- with .Values.s3.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.s3.secretAccessKeyKey }}
{{- end }}
{{- with .Values.s3.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Queueing (Job metadata labels, then a Job spec fragment): with kueue.queueName the Job carries Kueue's
queue-name label and is created suspended, as in Kueue's examples: Kueue starts it once it admits the whole
Job (all its pods' resources at once), and without Kueue it waits instead of running outside any quota.
*/}}
{{- define "trainer.queueLabels" -}}
{{- with .Values.kueue.queueName }}
kueue.x-k8s.io/queue-name: {{ . | quote }}
{{- end }}
{{- end }}

{{- define "trainer.queueSpec" -}}
{{- if .Values.kueue.queueName }}
suspend: true
{{- end }}
{{- end }}

{{/*
topologySpreadConstraints of the worker pods, passed through; one without a labelSelector counts this Job's
workers (the selector labels plus component: trainer), so spreading needs only maxSkew, topologyKey and
whenUnsatisfiable.
*/}}
{{- define "trainer.topologySpread" -}}
{{- $workers := include "trainer.selectorLabels" . | fromYaml }}
{{- $_ := set $workers "app.kubernetes.io/component" "trainer" }}
{{- range .Values.topologySpreadConstraints }}
{{- $constraint := deepCopy . }}
{{- if not (hasKey $constraint "labelSelector") }}
{{- $_ := set $constraint "labelSelector" (dict "matchLabels" $workers) }}
{{- end }}
- {{- toYaml $constraint | nindent 2 }}
{{- end }}
{{- end }}

{{/* Pod-level settings shared by the trainer and the ingest pods. */}}
{{/*
Recovery without a human (a Job spec fragment; `containerName` and the permanent `exitCodes` in the dict, and
the permanent `waitExitCodes` of the init container wait-for-data, if any): disruptions (preemption, eviction,
a node drained) never count against backoffLimit; a permanent failure (bad flags, bad data, the ingest Job
failed) fails the Job at once; anything else is retried, each failed pod replaced only once it has terminated
(never two pods of one index: Horovod ranks would clash).
*/}}
{{- define "trainer.recovery" -}}
podReplacementPolicy: Failed
podFailurePolicy:
  rules:
    - action: Ignore
      onPodConditions:
        - type: DisruptionTarget
    - action: FailJob
      onExitCodes:
        containerName: {{ .containerName }}
        operator: In
        values: {{ .exitCodes | toJson }}
    {{- with .ignoreExitCodes }}
    - action: Ignore
      onExitCodes:
        containerName: {{ $.containerName }}
        operator: In
        values: {{ . | toJson }}
    {{- end }}
    {{- with .waitExitCodes }}
    - action: FailJob
      onExitCodes:
        containerName: wait-for-data
        operator: In
        values: {{ . | toJson }}
    {{- end }}
{{- end }}

{{- define "trainer.podSpecCommon" -}}
serviceAccountName: {{ include "trainer.serviceAccountName" . }}
automountServiceAccountToken: false
restartPolicy: Never
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.schedulerName }}
schedulerName: {{ . }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{/* Writable places: the root file system is read-only. */}}
{{- define "trainer.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSize }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shmSize }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "trainer.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: shm
  mountPath: /dev/shm
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* prometheus.io annotations: the fallback for Prometheus set-ups without the operator. */}}
{{- define "trainer.scrapeAnnotations" -}}
{{- if and .Values.metrics.enabled .Values.metrics.annotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.metrics.port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{/*
The trainer pods' ports taken together (the schema checks each value alone; `fail`, as no JSON schema compares
two values): local rank r serves metrics on metrics.port + r, so the last of them must be a port (at most 65535)
and none of them the rendezvous port. Renders nothing.
*/}}
{{- define "trainer.checkPorts" -}}
{{- if .Values.metrics.enabled }}
{{- $slots := int (include "trainer.slots" .) }}
{{- $first := int .Values.metrics.port }}
{{- $last := add $first $slots -1 }}
{{- if gt $last 65535 }}
{{- fail (printf "metrics.port %d + local rank runs to %d with %d processes per pod (gpusPerWorker %d): above 65535; set metrics.port to %d or below" $first $last $slots (int .Values.gpusPerWorker) (sub 65536 $slots)) }}
{{- end }}
{{- $rendezvous := int .Values.rendezvous.port }}
{{- if and (ge $rendezvous $first) (le $rendezvous $last) }}
{{- fail (printf "rendezvous.port %d is also a metrics port: metrics.port %d + local rank, %d to %d (gpusPerWorker %d); move one of them so that they do not overlap" $rendezvous $first $first $last (int .Values.gpusPerWorker)) }}
{{- end }}
{{- end }}
{{- end }}
