"""The data contracts: one module per table, each opening with its schema and being the only
reader and writer of that table.

* :mod:`~aligner.data.io` - the one Parquet file-or-directory reader and the atomic writers;
* :mod:`~aligner.data.images` - the one image decoder (and failure rows);
* :mod:`~aligner.data.corpus` (+ :mod:`~aligner.data.corpus_plan` and
  :mod:`~aligner.data.corpus_shards`, its resumable plan and streaming reader) - image
  corpora: Parquet with bytes or URIs, folders, WebDataset tars;
* :mod:`~aligner.data.embeddings` - what the embedding job writes (+ the model that made it);
* :mod:`~aligner.data.queries` - queries and their rephrasings;
* :mod:`~aligner.data.preferences` - preference pairs;
* :mod:`~aligner.data.results` - an evaluation's metrics and per-query values.

The index directory's contract is :mod:`aligner.retrieval.index` (ids + faiss shards).
"""
