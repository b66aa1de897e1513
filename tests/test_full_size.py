"""Full-size BGE-VL-base (ViT-B/16) and BGE-VL-large (ViT-L/14) architectures, random weights, offline.

Slow (minutes, several GB of RAM): deselected by default, run with ``make test-slow``.
"""

from __future__ import annotations

import json

import pytest

from bgevl.export import ExportOptions, run_export


@pytest.mark.slow
@pytest.mark.parametrize("model,precision,dim", [("base", "fp32", 512), ("base", "int8", 512), ("large", "fp32", 768), ("large", "fp16", 768)])
def test_full_size_architecture_exports_and_validates(model, precision, dim, tmp_path):
    out = run_export(ExportOptions(output=tmp_path / model, model=model, random_weights=True, precision=precision),
                     sink=print)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["weights"] == "random" and manifest["model"]["embedding_dim"] == dim
    assert manifest["validation"]["passed"] is True
    for name in ("vision", "text"):
        assert manifest["graphs"][name]["validation"]["min_cosine"] >= manifest["validation"]["threshold_min_cosine"]
    print(json.dumps({k: v["validation"] for k, v in manifest["graphs"].items()}, indent=1))
