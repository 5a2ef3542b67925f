#!/usr/bin/env bash
# The encoding job on a Spark cluster with GPU executors (YARN, Kubernetes or standalone; Spark 4):
# one GPU per executor, one task per executor at a time, so each Python worker holds one encoder on
# its executor's GPU. Run from a checkout (or an image) holding jobs/ and pipeline/; the package and
# its dependencies must be installed on the executors (the image's python; see infra/Dockerfile).
# Input and output are read and written through fsspec (s3fs): no Hadoop S3 connector is needed.
# Scheduled reindexing: the same line with --reindex after --config.
set -euo pipefail
spark-submit \
    --master "${SPARK_MASTER:-yarn}" \
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
    jobs/spark_encode.py --config jobs/configs/s3-gpu.yaml "$@"
