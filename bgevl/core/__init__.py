"""The ground floor: what every other part of bgevl builds on, knowing no model family.

Graph declarations (:mod:`~bgevl.core.specs`), the manifest, errors, probes, parity and thresholds,
input preprocessing helpers, output staging, and the family protocol (:mod:`~bgevl.core.family`)
with its registry (:mod:`~bgevl.core.registry`). Nothing here imports from the floors above.
"""
