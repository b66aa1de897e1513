"""The registry of model families (see ``bgevl.families.base`` for the protocol).

Adding a family: a package ``bgevl/families/<name>/`` whose ``__init__`` defines a
:class:`~bgevl.families.base.Family` subclass and registers an instance with :func:`register`,
plus its module path in :data:`FAMILY_MODULES` below (the one line outside its package).
"""

from __future__ import annotations

import importlib

from bgevl.errors import BgevlError
from bgevl.families.base import Family
from bgevl.specs import ModelSpec

#: The family packages, imported on first use (each registers itself).
FAMILY_MODULES = (
    "bgevl.families.clip",
    "bgevl.families.mllm",
    "bgevl.families.visualized",
)

_FAMILIES: dict[str, Family] = {}
_loaded = False


def register(family: Family) -> Family:
    if family.name in _FAMILIES:
        raise ValueError(f"model family {family.name!r} is registered twice")
    _FAMILIES[family.name] = family
    return family


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in FAMILY_MODULES:
            importlib.import_module(module)


def families() -> dict[str, Family]:
    _load()
    return dict(_FAMILIES)


def get_family(name: str) -> Family:
    """The family registered as ``name``; an unknown name is an error listing the known ones."""
    _load()
    try:
        return _FAMILIES[name]
    except KeyError:
        raise BgevlError(f"unknown model family {name!r}; known families: {', '.join(_FAMILIES)}") from None


def all_models() -> dict[str, ModelSpec]:
    """Every ``--model`` key of every family, in registration order."""
    return {spec.key: spec for family in families().values() for spec in family.models}


def get_model_spec(key: str) -> ModelSpec:
    models = all_models()
    try:
        return models[key]
    except KeyError:
        raise BgevlError(f"unknown model {key!r}; choose one of: {', '.join(models)}") from None


def family_of(spec: ModelSpec) -> Family:
    return get_family(spec.family)
