"""The registry of model families: every family is a plug-in found through the Python entry-point
group ``bgevl.families``, the built-in ones included (``pyproject.toml``), so a family can live in
another installed package without a change to this one.

An entry point names a :class:`~bgevl.core.family.Family` subclass or instance::

    [project.entry-points."bgevl.families"]
    siglip = "my_package.siglip:SiglipFamily"

A plug-in that fails to load does not take the others down: it is one line on stderr naming it and
its error, and asking for it (``--model`` of its models, or its family name) is that line as the
error.
"""

from __future__ import annotations

import sys
from importlib.metadata import EntryPoint, entry_points

from bgevl.core.errors import BgevlError
from bgevl.core.family import Family
from bgevl.core.specs import ModelSpec

#: The entry-point group model families register in.
ENTRY_POINT_GROUP = "bgevl.families"

_FAMILIES: dict[str, Family] = {}
#: entry-point name -> the one-line reason its plug-in could not be loaded
_BROKEN: dict[str, str] = {}
_loaded = False


def register(family: Family) -> Family:
    """Add a family (the entry points do this; tests may register one directly)."""
    if not isinstance(family, Family):
        raise BgevlError(f"model family plug-in {family!r} is not a bgevl.core.family.Family")
    if family.name in _FAMILIES:
        raise BgevlError(f"model family {family.name!r} is registered twice")
    taken = {spec.key for known in _FAMILIES.values() for spec in known.models}
    clashing = sorted(taken & {spec.key for spec in family.models})
    if clashing:
        raise BgevlError(f"model family {family.name!r} declares --model keys another family has: {', '.join(clashing)}")
    _FAMILIES[family.name] = family
    return family


def _is_builtin(entry: EntryPoint) -> bool:
    return entry.value.startswith("bgevl.families.")


def _report_broken(entry: EntryPoint, why: str, own_name: bool = True) -> None:
    """One stderr line for a plug-in that is not used, kept for ``get_family`` and ``broken_plugins`` under its
    entry-point name (``name (value)`` where that name is taken or is not its own to claim)."""
    key = entry.name if own_name and entry.name not in _BROKEN else f"{entry.name} ({entry.value})"
    _BROKEN[key] = f"model family plug-in {entry.name!r} ({entry.value}) {why}"
    print(f"bgevl: {_BROKEN[key]}", file=sys.stderr)


def _load_entry_point(entry: EntryPoint) -> None:
    try:
        loaded = entry.load()
        register(loaded() if isinstance(loaded, type) else loaded)
    except (Exception, SystemExit) as error:  # a broken plug-in is reported, the others keep working (sys.exit too)
        reason = str(error).splitlines()[0] if str(error) else ""
        _report_broken(entry, f"could not be loaded: {type(error).__name__}{': ' + reason if reason else ''}")


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        # the built-in families first, so that a plug-in cannot take their names: one that registers the
        # entry-point name or the family name of a built-in one is reported broken, and the built-in one serves
        entries = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: not _is_builtin(e))
        seen: set[tuple[str, str]] = set()
        builtin_names = {e.name for e in entries if _is_builtin(e)}
        for entry in entries:
            if (entry.name, entry.value) in seen:  # a package on sys.path twice lists its entry points twice
                continue
            seen.add((entry.name, entry.value))
            if entry.name in builtin_names and not _is_builtin(entry):
                _report_broken(entry, f"was not loaded: {entry.name!r} is a built-in family's entry-point name; "
                                      f"register the plug-in under another name", own_name=False)
                continue
            _load_entry_point(entry)
        if not _FAMILIES and not _BROKEN:
            raise BgevlError(f"no model family is registered (entry-point group {ENTRY_POINT_GROUP!r}): "
                             "install the package (`pip install -e .`) so its entry points exist")


def families() -> dict[str, Family]:
    """Every registered family by name, in entry-point order."""
    _load()
    return dict(_FAMILIES)


def broken_plugins() -> dict[str, str]:
    """The plug-ins that failed to load: entry-point name -> the one-line reason."""
    _load()
    return dict(_BROKEN)


def get_family(name: str) -> Family:
    """The family registered as ``name``; an unknown name is an error listing the known ones."""
    _load()
    try:
        return _FAMILIES[name]
    except KeyError:
        if name in _BROKEN:
            raise BgevlError(_BROKEN[name]) from None
        raise BgevlError(f"unknown model family {name!r}; known families: {', '.join(_FAMILIES)}") from None


def int8_modes() -> tuple[str, ...]:
    """Every ``--int8-mode`` a registered family declares (``GraphExport.int8_forms``), in declaration order:
    the command line's choices."""
    return tuple(dict.fromkeys(form.mode for family in families().values() for form in family.int8_forms))


def all_models() -> dict[str, ModelSpec]:
    """Every ``--model`` key of every family, in registration order."""
    return {spec.key: spec for family in families().values() for spec in family.models}


def get_model_spec(key: str) -> ModelSpec:
    models = all_models()
    try:
        return models[key]
    except KeyError:
        broken = "".join(f"; {reason}" for reason in _BROKEN.values())
        raise BgevlError(f"unknown model {key!r}; choose one of: {', '.join(models)}{broken}") from None


def family_of(spec: ModelSpec) -> Family:
    return get_family(spec.family)
