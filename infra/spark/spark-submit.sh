#!/usr/bin/env bash
# The encoding job on a Spark cluster with GPU executors (YARN, Kubernetes or standalone; Spark 4):
# one GPU per executor, one task per executor at a time, so each Python worker holds one encoder on
# its executor's GPU. Run from a checkout (or an image) holding jobs/ and pipeline/; the package and
# its dependencies must be installed on the executors (the image's python; see infra/Dockerfile).
# Input and output are read and written through fsspec (s3fs): no Hadoop S3 connector is needed.
# Scheduled reindexing: the same line with --reindex after --config.
#
# Store keys: the executors load the store, so they need its key (QDRANT_API_KEY, PINECONE_API_KEY,
# MILVUS_TOKEN, PGPASSWORD), never from the repo or this command line (argv is readable by every
# user of the host). On Kubernetes they come from a Secret (secretKeyRef below; create it with
# `kubectl create secret generic splade-vector-store --from-literal=qdrant-api-key=...`); on
# YARN or standalone, from the nodes' own environment (spark-env.sh / yarn-env.sh, the image).
# spark.redaction.regex keeps any such value out of the Spark UI and event logs.
set -euo pipefail
MASTER="${SPARK_MASTER:-yarn}"
SECRETS=()
if [[ "$MASTER" == k8s://* ]]; then
    SECRETS=(
        --conf spark.kubernetes.driver.secretKeyRef.QDRANT_API_KEY=splade-vector-store:qdrant-api-key
        --conf spark.kubernetes.executor.secretKeyRef.QDRANT_API_KEY=splade-vector-store:qdrant-api-key
    )
fi
spark-submit \
    --master "$MASTER" \
    --deploy-mode client \
    --conf spark.executor.resource.gpu.amount=1 \
    --conf spark.task.resource.gpu.amount=1 \
    --conf spark.executor.resource.gpu.discoveryScript=/opt/spark/examples/src/main/scripts/getGpusResources.sh \
    --conf spark.executor.cores=8 \
    --conf spark.task.cpus=8 \
    --conf spark.python.worker.reuse=true \
    --conf spark.task.maxFailures=4 \
    --conf spark.speculation=true \
    --conf spark.executorEnv.PYSPARK_PYTHON=/opt/venv/bin/python \
    --conf 'spark.redaction.regex=(?i)secret|password|token|access[.]?key|api[_.]?key' \
    ${SECRETS[@]+"${SECRETS[@]}"} \
    jobs/spark_encode.py --config jobs/configs/s3-gpu.yaml "$@"
