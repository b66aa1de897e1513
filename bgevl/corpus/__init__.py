"""Embedding a corpus offline (``bgevl-embed``): readers, the local and Ray Data engines, clip-retrieval's output layout.

``embed_corpus(CorpusOptions(export=..., input=..., output=...))`` reads a folder of images, a text
file, a table or WebDataset shards (``bgevl.corpus.readers``), embeds it with ``Embedder`` in
partitions (``bgevl.corpus.pipeline``; on Ray Data: ``bgevl.corpus.ray_engine``) and writes
``img_emb/``, ``text_emb/``, ``metadata/``, a Parquet ``id, embedding`` table, the failures and
``manifest.json`` (``bgevl.corpus.output``); a killed job resumes from its complete partitions.
"""

from bgevl.corpus.job import DEFAULT_PARTITION_SIZE, CorpusOptions, embed_corpus

__all__ = ["DEFAULT_PARTITION_SIZE", "CorpusOptions", "embed_corpus"]
