"""The built-in model families, one package each (CLIP dual encoders, LLaVA-NeXT embedders,
Visualized-BGE). They register like any plug-in, through the entry-point group ``bgevl.families``
(``pyproject.toml``; the registry is :mod:`bgevl.core.registry`, the protocol :mod:`bgevl.core.family`).
"""
