"""Entrypoint for Spark job submission (Databricks, EMR, Dataproc, or any spark-submit):

    spark-submit --master <master> jobs/spark_encode.py --config jobs/configs/s3-gpu.yaml

Takes the same flags as ``splade-pipeline encode`` (every config field, ``--config``); runs the
encoding job with Spark running the tasks (``--engine spark``). ``--reindex`` runs
``splade-pipeline reindex`` instead (its flags too: ``--dry-run``, ``--allow-mass-delete``).
"""

import os
import sys

# Submitted from a checkout: the driver imports the package from it, and the executors get the
# same code as a zip on their path (ahead of any installed copy), so both run one version.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def ship_package() -> None:
    """Zip this checkout's ``pipeline`` package and add it to the executors' Python path."""
    import shutil
    import tempfile

    from pyspark.sql import SparkSession

    folder = tempfile.mkdtemp(prefix="splade-pipeline-")
    archive = shutil.make_archive(os.path.join(folder, "pipeline"), "zip", ROOT, "pipeline")
    SparkSession.builder.getOrCreate().sparkContext.addPyFile(archive)


if __name__ == "__main__":
    from pipeline.cli import run

    argv = sys.argv[1:]
    ship_package()
    command = "reindex" if "--reindex" in argv else "encode"
    run([command, "--engine", "spark", *(a for a in argv if a != "--reindex")])
