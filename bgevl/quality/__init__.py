"""Retrieval quality of exports: recall@k and mAP@k on the user's data, against the fp32 export (``bgevl-eval``).

``evaluate(load_data(DIR), [RunSpec(fp32_dir), RunSpec(int8_dir)])`` embeds image-text pairs and
composed-retrieval triplets (``bgevl.quality.data``, read with the corpus readers) with each export,
ranks the gallery, and reports text->image and image->text recall@k, composed recall@k and CIRCO's
mAP@k (``bgevl.quality.metrics``), each with its bootstrap 95 % interval, the paired difference to
the first run (the reference) and the top-10 overlap with its rankings. ``bgevl-export --quality-data
DIR --max-recall-drop POINTS`` runs the same evaluation on a new export against the fp32 graphs of
the same checkpoint before the export is written.
"""

from bgevl.quality.data import QualityData, load_data, read_pairs, read_triplets
from bgevl.quality.evaluate import EvalOptions, RunSpec, evaluate, markdown, worst_drop

__all__ = ["EvalOptions", "QualityData", "RunSpec", "evaluate", "load_data", "markdown", "read_pairs", "read_triplets",
           "worst_drop"]
