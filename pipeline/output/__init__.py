"""The output: where it is and everything about the files in it. No Ray.

- ``location``: the output location resolved once (filesystem + root, atomic writes)
- ``layout``: the folders and how an encoded block becomes data and rejects files
- ``commits``: the commit protocol (progress records, commits, what a re-run may reuse)
- ``lock``: one run at a time per output
"""
