"""The job on Ray: every Ray Data plan and the only ``ray.init``.

- ``cluster``: start or join Ray (the SIGTERM handling kept)
- ``plan``: driver-side checks and the read -> encode -> write Ray Data plan
- ``stages``: the per-batch work of each stage (read, encode, write, upsert)
- ``steps``: what every run does (write with progress records, commit, summary)
- ``encode``: the encoding job; ``reindex``: incremental reindexing; ``resume``: what a re-run keeps
- ``load``: loading the committed output into a vector store
- ``attempts``: attempt counts across actor deaths; ``summary``: the run summary; ``faults``: test-only fault injection
"""
