"""TensorRT's API cannot drift unnoticed: every TensorRT name bgevl uses exists in every supported version.

No GPU and no TensorRT needed. The names the code uses are collected from bgevl's source with ``ast``:
attributes of the ``tensorrt`` module (``trt``, ``self.trt``) and of every value derived from it within a
function (``builder = trt.Builder(...)``, ``config = builder.create_builder_config()``, ``config.clear_flag``),
enum members included. The names each version has are recorded in tests/data/tensorrt_api/ from the
bindings wheels by scripts/tensorrt-api-names.py (its docstring says how, and why that is robust).
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from bgevl.runtime.tensorrt import TENSORRT_REQUIREMENT

ROOT = Path(__file__).resolve().parent.parent
API_DIR = Path(__file__).resolve().parent / "data" / "tensorrt_api"
#: names bound to the tensorrt module itself
MODULE_ROOTS = {"trt", "self.trt"}


def _root(node: ast.AST) -> str | None:
    """The name an expression is rooted at (``self.x`` for attributes of self), through calls, attributes, subscripts."""
    while True:
        if isinstance(node, ast.Call):
            node = node.func
        elif isinstance(node, ast.Subscript):
            node = node.value
        elif isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                return f"self.{node.attr}"
            node = node.value
        elif isinstance(node, ast.Name):
            return node.id
        else:
            return None


def _target_keys(target: ast.AST) -> list[str]:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
        return [f"self.{target.attr}"]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [k for t in target.elts for k in _target_keys(t)]
    return []


def _params(fn: ast.FunctionDef) -> list[str]:
    names = [a.arg for a in [*fn.args.posonlyargs, *fn.args.args]]
    return names[1:] if names[:1] == ["self"] else names


def _taint(functions: list[ast.FunctionDef]) -> dict[int, set[str]]:
    """Per function, the names holding TensorRT values: the module, what is assigned from a TensorRT value
    (``self.x`` shared by the methods), and parameters that a call in this module passes one to."""
    by_name = {fn.name: fn for fn in functions}
    tainted = {id(fn): set(MODULE_ROOTS) for fn in functions}
    shared: set[str] = set()
    changed = True
    while changed:  # sets only grow, over finitely many names: terminates
        changed = False
        for fn in functions:
            names = tainted[id(fn)] | shared
            for node in sorted((n for n in ast.walk(fn) if isinstance(n, (ast.Assign, ast.AnnAssign))),
                               key=lambda n: (n.lineno, n.col_offset)):
                if node.value is not None and _root(node.value) in names:
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    names |= {k for t in targets for k in _target_keys(t)}
            for call in (n for n in ast.walk(fn) if isinstance(n, ast.Call)):
                func = call.func
                callee = by_name.get(func.id if isinstance(func, ast.Name) else
                                     func.attr if isinstance(func, ast.Attribute) and _root(func) == f"self.{func.attr}" else "")
                if callee is None:
                    continue
                params = _params(callee)
                passed = [params[i] for i, a in enumerate(call.args) if i < len(params) and _root(a) in names]
                passed += [k.arg for k in call.keywords if k.arg and _root(k.value) in names]
                if not set(passed) <= tainted[id(callee)]:
                    tainted[id(callee)] |= set(passed)
                    changed = True
            new_shared = {k for k in names if k.startswith("self.")}
            if not names <= tainted[id(fn)] | shared or not new_shared <= shared:
                tainted[id(fn)] |= names
                shared |= new_shared
                changed = True
    return {key: names | shared for key, names in tainted.items()}


def tensorrt_uses(source: str, where: str = "<source>") -> tuple[dict[str, list[str]], set[str], list[str]]:
    """(name -> places used, names only probed with hasattr, problems) for one module's source."""
    tree = ast.parse(source)
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    taint = _taint(functions)
    uses: dict[str, list[str]] = {}
    optional: set[str] = set()
    problems: list[str] = []
    for fn in functions:
        tainted = taint[id(fn)]
        for node in ast.walk(fn):
            if isinstance(node, ast.Attribute) and _root(node.value) in tainted:
                if isinstance(node.value, ast.Name) and node.value.id == "self":
                    continue  # self.trt itself: an attribute of bgevl's object, not of TensorRT's
                if node.attr.startswith("__") and node.attr != "__version__":
                    continue
                uses.setdefault(node.attr, []).append(f"{where}:{node.lineno}")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr", "setattr") \
                    and node.args and _root(node.args[0]) in tainted:
                name = node.args[1] if len(node.args) > 1 else None
                if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
                    problems.append(f"{where}:{node.lineno}: {node.func.id}() with a computed name on a TensorRT "
                                    f"object cannot be checked; name the attribute")
                elif node.func.id == "hasattr":
                    optional.add(name.value)
                else:
                    uses.setdefault(name.value, []).append(f"{where}:{node.lineno}")
    return {name: sorted(set(places)) for name, places in uses.items()}, optional, problems


def bgevl_uses() -> tuple[dict[str, list[str]], set[str], list[str]]:
    uses: dict[str, list[str]] = {}
    optional: set[str] = set()
    problems: list[str] = []
    for path in sorted((ROOT / "bgevl").rglob("*.py")):
        u, o, p = tensorrt_uses(path.read_text(), str(path.relative_to(ROOT)))
        for name, places in u.items():
            uses.setdefault(name, []).extend(places)
        optional |= o
        problems += p
    return uses, optional, problems


def recorded_apis() -> dict[str, list[str]]:
    apis = {}
    for path in sorted(API_DIR.glob("tensorrt-*.txt")):
        version = path.stem.removeprefix("tensorrt-")
        apis[version] = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return apis


def missing_names(names, api: list[str]) -> list[str]:
    """Names neither listed nor the tail of a listed string (the linker shares string tails)."""
    listed = set(api)
    return sorted(n for n in names if n not in listed and not any(s.endswith(n) for s in api))


def test_recorded_versions_span_the_supported_range_declared_once():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["tensorrt"]
    assert f"tensorrt{TENSORRT_REQUIREMENT}" in extra  # pyproject's extra and the import check agree
    versions = sorted(Version(v) for v in recorded_apis())
    assert all(v in SpecifierSet(TENSORRT_REQUIREMENT) for v in versions), versions
    lowest = min(SpecifierSet(TENSORRT_REQUIREMENT), key=lambda s: s.operator != ">=")
    assert lowest.operator == ">=" and versions[0].release[:2] == Version(lowest.version).release[:2]  # 10.12
    assert {v.major for v in versions} == {10, 11}  # both majors of the range


def test_every_tensorrt_name_the_code_uses_exists_in_every_supported_version():
    uses, optional, problems = bgevl_uses()
    assert not problems, problems
    # the collector sees the builder and the runner (a guard that collects nothing cannot fail)
    for expected in ("create_network", "STRONGLY_TYPED", "clear_flag", "TF32", "parse_from_file", "build_serialized_network",
                     "execute_async_v3", "set_tensor_address", "get_tensor_dtype", "nptype", "__version__"):
        assert expected in uses, expected
    failures = []
    for version, api in recorded_apis().items():
        for name in missing_names(set(uses) - optional, api):
            failures.append(f"TensorRT {version} has no {name!r} (used at {', '.join(uses[name])})")
    assert not failures, "\n".join(failures)


WEAKLY_TYPED_BUILD = '''
def hold_fp32(net, count):
    for i in range(count):
        layer = net.get_layer(i)
        layer.precision = trt.float32
        layer.set_output_type(0, trt.float32)


def build(onnx_path):
    trt = import_tensorrt()
    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    network = builder.create_network(0)
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.INT8)
    config.set_flag(trt.BuilderFlag.FP16)
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    config.int8_calibrator = None
    hold_fp32(network, 3)  # a TensorRT object passed to a helper: its parameter is followed
    path = onnx_path.with_suffix(".plan")
    return path.stem  # not TensorRT's: a local not derived from it
'''


def test_the_guard_catches_the_weak_typing_api_that_tensorrt_11_removed():
    """The code this project had before (weakly typed int8 with per-layer fp32): the guard names what 11.x lacks."""
    uses, _, problems = tensorrt_uses(WEAKLY_TYPED_BUILD)
    assert not problems and "stem" not in uses and "with_suffix" not in uses
    apis = recorded_apis()
    removed = {"FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS", "int8_calibrator", "precision", "set_output_type"}
    assert removed <= set(uses)
    v10 = next(v for v in apis if v.startswith("10."))
    v11 = next(v for v in apis if v.startswith("11."))
    assert missing_names(uses, apis[v10]) == []
    # INT8 also ends UINT8 (kept in 11.x): present by the tail rule, a documented blind spot
    assert missing_names(uses, apis[v11]) == sorted(removed - {"INT8"})
    with_computed_flag = "def f(trt, flag):\n    trt.BuilderFlag\n    return getattr(trt.BuilderFlag, flag)\n"
    assert "computed name" in tensorrt_uses(with_computed_flag)[2][0]


@pytest.mark.parametrize("name", ["FP16", "OBEY_PRECISION_CONSTRAINTS", "set_output_type"])
def test_recorded_lists_reflect_the_11x_migration(name):
    apis = recorded_apis()
    assert any(not missing_names([name], api) for v, api in apis.items() if v.startswith("10."))
    assert all(missing_names([name], api) == [name] for v, api in apis.items() if v.startswith("11."))
