"""The family protocol: generic code never asks which family it holds; the registry refuses unknown ones."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

import bgevl
from bgevl.core.errors import BgevlError
from bgevl.core.registry import families, get_family, get_model_spec

PACKAGE = Path(bgevl.__file__).parent
#: each registered family's own package (where its entry point's class is defined)
FAMILY_DIRS = [Path(sys.modules[type(family).__module__].__file__).parent for family in families().values()]

#: What branching on a family looks like: comparing a family name, naming a family in a string
#: literal, testing a model key's suffix, importing a family's own files, or dispatching on a
#: family-specific class.
BRANCHING = re.compile(
    r"""family\s*(==|!=)|\bbillions\s*[<>]|["'](clip|mllm|visualized)["']|endswith\(["']mllm|"""
    r"""^\s*(from|import)\s+bgevl\.families\.(clip|mllm|visualized)\b|isinstance\([^)]*\b(Clip|Mllm|Visualized)\w*""")


def _generic_modules() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if not any(d in p.parents for d in FAMILY_DIRS)]


def test_no_module_outside_a_family_package_branches_on_the_family():
    offenders = []
    for path in _generic_modules():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if BRANCHING.search(line):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not offenders, "family-specific code outside bgevl/families/<family>/:\n" + "\n".join(offenders)


def test_the_grep_catches_what_it_is_meant_to_catch():
    for line in ('if spec.family == "mllm":', 'key.endswith("mllm")', "from bgevl.families.clip.graphs import X",
                 "writer.mllm() if manifest.family == 'mllm' else writer.clip()", "isinstance(e, ClipEmbedder)",
                 "if spec.billions > 2:"):
        assert BRANCHING.search(line), line
    assert not BRANCHING.search("family = family_of(spec)")


def test_each_family_lives_in_its_own_package_and_declares_its_models():
    assert set(families()) == {"clip", "mllm", "screenshot", "visualized"}
    for name, family in families().items():
        assert (PACKAGE / "families" / name / "__init__.py").is_file()
        assert family.models and all(spec.family == name for spec in family.models)
        assert get_model_spec(family.models[0].key).family == name


def test_an_unknown_family_is_an_error_listing_the_known_ones():
    with pytest.raises(BgevlError, match=r"unknown model family 'blip'; known families: clip, mllm, screenshot, visualized"):
        get_family("blip")


def test_benchmark_exports_of_every_mllm_keep_the_family_batch_range():
    """The old ``key.endswith("mllm")`` test missed mllm-s1/-s2/-v1.5: every model of a family now reads its
    family's declaration."""
    for key in ("mllm-s1", "mllm-s2", "mllm-v1.5-zs", "tiny-mllm"):
        family = get_family(get_model_spec(key).family)
        assert family.default_batch == (2, 8) and not family.bench_grows_max_batch
    assert get_family(get_model_spec("base").family).bench_grows_max_batch
