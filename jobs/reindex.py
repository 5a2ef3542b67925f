"""Entrypoint for scheduled reindexing through cluster job submission:

    ray job submit --address http://<head>:8265 --working-dir . -- \\
        python jobs/reindex.py --config jobs/configs/s3-gpu.yaml

Takes the same flags as ``splade-pipeline reindex`` (every config field, ``--config``,
``--dry-run``, ``--allow-mass-delete``). Exits 2 with the reason when the output is locked
by another run or the mass-delete guard refuses.
"""

import os
import sys

# With --working-dir the repository root is the job's cwd: make the package importable from it
# even where it is not pip-installed on the cluster image.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import run  # noqa: E402

if __name__ == "__main__":
    run(["reindex", *sys.argv[1:]])
