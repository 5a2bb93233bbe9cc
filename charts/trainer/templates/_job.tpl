{{/*
The training Job (a dict: `root`, the chart's context; `name`, the Job's name as its pods know it; `output`, the
run's --output; `trial`: a Katib trial's, named by Katib, its trainer.train also given --katib-metrics and the
sweep's parameters). templates/job.yaml renders it for one run, templates/experiment.yaml as Katib's trial.
*/}}
{{- define "trainer.job" }}
{{- $name := .name }}
{{- $output := .output }}
{{- $trial := .trial }}
{{- with .root }}
{{- $fullname := include "trainer.fullname" . }}
{{- $slots := int (include "trainer.slots" .) }}
{{- $workers := int .Values.workers }}
{{- $resources := deepCopy .Values.resources }}
{{- if gt (int .Values.gpusPerWorker) 0 }}
{{- $limits := merge (dict "nvidia.com/gpu" (int .Values.gpusPerWorker)) (default dict (get $resources "limits")) }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
# N pods, pod i = <job>-i.<service>: every pod runs trainer.launch, which starts one trainer.train process per
# GPU with the HOROVOD_* environment; pod 0 also serves the rendezvous (docs/training.md).
apiVersion: batch/v1
kind: Job
metadata:
  {{- if not $trial }}
  name: {{ $name }}
  {{- end }}
  labels:
    {{- include "trainer.labels" . | nindent 4 }}
    app.kubernetes.io/component: trainer
    {{- with include "trainer.queueLabels" . }}{{ . | nindent 4 }}{{ end }}
  {{- if eq .Values.schedulerName "volcano" }}
  annotations:
    # Volcano's PodGroup of this Job: all the pods or none, as Horovod needs every rank.
    scheduling.volcano.sh/group-min-member: {{ $workers | quote }}
  {{- end }}
spec:
  completionMode: Indexed
  completions: {{ $workers }}
  parallelism: {{ $workers }}
  # A budget per pod index: an incident costs the index that failed (its consequences elsewhere are
  # ignored: podFailurePolicy), and one index failing for good fails the Job (all pods form one run).
  backoffLimitPerIndex: {{ .Values.retries }}
  maxFailedIndexes: 0
  {{- with include "trainer.queueSpec" . }}{{ . | nindent 2 }}{{ end }}
  {{- /* 8: pod 0 ended a rendezvous attempt another pod's replacement broke; 9: a rank lost another one.
         Both are the consequence of a failure already counted (or of a disruption, never counted). */}}
  {{- $recovery := dict "containerName" "trainer" "exitCodes" (list 2 3 4 6) "ignoreExitCodes" (list 8 9) }}
  {{- if .Values.ingest.enabled }}
  {{- $_ := set $recovery "waitExitCodes" (list 2 3) }}
  {{- end }}
  {{- include "trainer.recovery" $recovery | nindent 2 }}
  template:
    metadata:
      labels:
        {{- include "trainer.selectorLabels" . | nindent 8 }}
        app.kubernetes.io/component: trainer
        {{- with .Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- $annotations := merge (include "trainer.scrapeAnnotations" . | fromYaml) .Values.podAnnotations }}
      {{- with $annotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      {{- include "trainer.podSpecCommon" . | nindent 6 }}
      # The headless Service: pod i resolves as <job>-i.<service>.
      subdomain: {{ $fullname }}
      # SIGTERM -> the ranks checkpoint at their next step boundary and exit (docs/training.md).
      terminationGracePeriodSeconds: {{ .Values.train.terminationGracePeriodSeconds }}
      {{- if .Values.ingest.enabled }}
      initContainers:
        # The ingest of the same release writes manifest.json last, once every shard is committed; if the
        # ingest Job fails instead, this exits 3 (FailJob above) rather than hold the GPUs (docs/kubernetes.md).
        - name: wait-for-data
          image: {{ include "trainer.image" . }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          command: [python, -m, ingest.wait]
          args:
            - {{ required "data.url is required: where the ingest writes the shards" .Values.data.url | quote }}
            - --job={{ include "trainer.ingestName" . }}
            - --namespace={{ .Release.Namespace }}
          {{- with include "trainer.storageEnv" . | trim }}
          env:
            {{- . | nindent 12 }}
          {{- end }}
          securityContext:
            {{- toYaml .Values.securityContext | nindent 12 }}
          volumeMounts:
            {{- include "trainer.volumeMounts" . | nindent 12 }}
            # The API token of this container alone (the pod mounts none): get on the ingest Job, nothing else.
            - name: ingest-status-token
              mountPath: /var/run/secrets/kubernetes.io/serviceaccount
              readOnly: true
      {{- end }}
      containers:
        - name: trainer
          image: {{ include "trainer.image" . }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          command: [python, -m, trainer.launch]
          args:
            - --pods={{ $workers }}
            - --slots={{ $slots }}
            - --pod-index=$(JOB_COMPLETION_INDEX)
            - {{ printf "--host-template=%s-{index}.%s" $name $fullname | quote }}
            - --port={{ .Values.rendezvous.port }}
            - --rendezvous-timeout={{ .Values.rendezvous.timeoutSeconds }}
            - {{ printf "--iface=%s" .Values.networkInterface | quote }}
            - --
            - python
            - -m
            - trainer.train
            - {{ printf "--data=%s" (required "data.url is required: the --output of ingest.shard" .Values.data.url) | quote }}
            - {{ printf "--output=%s" $output | quote }}
            {{- with .Values.train.preset }}
            - {{ printf "--preset=%s" . | quote }}
            {{- end }}
            {{- with .Values.train.model }}
            - {{ printf "--model=%s" . | quote }}
            {{- end }}
            {{- with .Values.train.epochs }}
            - --epochs={{ . }}
            {{- end }}
            {{- with .Values.train.batchSize }}
            - --batch-size={{ . }}
            {{- end }}
            {{- if .Values.metrics.enabled }}
            - --metrics-port={{ .Values.metrics.port }}
            {{- end }}
            - --stall-timeout={{ .Values.train.stallTimeoutSeconds }}
            {{- range .Values.train.extraArgs }}
            - {{ . | quote }}
            {{- end }}
            {{- if $trial }}
            # Pod 0 holds rank 0, which prints the epochs' accuracies for Katib's StdOut collector.
            - --katib-metrics
            {{- range .Values.sweep.parameters }}
            - {{ printf "--%s=${trialParameters.%s}" .name .name | quote }}
            {{- end }}
            {{- end }}
          env:
            {{- include "trainer.indexEnv" . | nindent 12 }}
            # Gloo waits this long for every rank to register: pods may start minutes apart. It also bounds
            # each collective; in training, --stall-timeout is the tighter bound.
            - name: HOROVOD_GLOO_TIMEOUT_SECONDS
              value: {{ .Values.rendezvous.timeoutSeconds | quote }}
            {{- with include "trainer.storageEnv" . | trim }}
            {{- . | nindent 12 }}
            {{- end }}
          ports:
            - name: rendezvous
              containerPort: {{ .Values.rendezvous.port }}
            {{- if .Values.metrics.enabled }}
            {{- range $slot := until $slots }}
            - name: metrics-{{ $slot }}
              containerPort: {{ add $.root.Values.metrics.port $slot }}
            {{- end }}
            {{- end }}
          {{- with $resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          securityContext:
            {{- toYaml .Values.securityContext | nindent 12 }}
          volumeMounts:
            {{- include "trainer.volumeMounts" . | nindent 12 }}
      volumes:
        {{- include "trainer.volumes" . | nindent 8 }}
        {{- if .Values.ingest.enabled }}
        # What automountServiceAccountToken would give every container: a short-lived, rotated token and the CA.
        - name: ingest-status-token
          projected:
            sources:
              - serviceAccountToken:
                  path: token
                  expirationSeconds: 3600
              - configMap:
                  name: kube-root-ca.crt
                  items:
                    - key: ca.crt
                      path: ca.crt
        {{- end }}
      {{- with .Values.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with include "trainer.topologySpread" . }}
      topologySpreadConstraints:
        {{- . | nindent 8 }}
      {{- end }}
{{- end }}
{{- end }}
