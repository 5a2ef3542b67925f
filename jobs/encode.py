"""Entrypoint for cluster job submission:

    ray job submit --address http://<head>:8265 --working-dir . -- \\
        python jobs/encode.py --config jobs/configs/sample.yaml

Takes the same flags as ``splade-pipeline encode`` (every config field, ``--config``).
"""

import os
import sys

# With --working-dir the repository root is the job's cwd: make the package importable from it
# even where it is not pip-installed on the cluster image.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import run  # noqa: E402

if __name__ == "__main__":
    run(["encode", *sys.argv[1:]])
