"""Texts to SPLADE sparse vectors: :class:`~pipeline.encode.encoder.SpladeEncoder` and its math.

Usable alone (a notebook) or inside any engine's UDF. Imports torch, transformers, numpy and
pyarrow arrays only: never Ray, fsspec, pyarrow.parquet, or the job, output or store modules
(``tests/test_layering.py`` holds it to that).

- ``encoder``: the encoder (tokenize, micro-batch, forward, pool, prune; Arrow out)
- ``splade``: pooling, pruning and CSR conversion (pure torch)
- ``batching``: token-budget micro-batches; ``packed``: the padding-free BERT/DistilBERT forward
- ``heads``: splitting a masked-LM into encoder and head; ``screen``: the certified bf16 decoder screen
- ``sparse``: the Arrow sparse type; ``bundled``: the bundled SPLADE-tiny; ``fingerprint``: what decides the vectors
"""
