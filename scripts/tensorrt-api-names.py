#!/usr/bin/env python3
"""Record the Python API names of TensorRT releases, for tests/test_tensorrt_api.py (offline, no GPU).

    python scripts/tensorrt-api-names.py tensorrt-cu12-bindings==10.12.0.36 tensorrt-cu13-bindings==11.4.0.106

Each argument is a requirement of a TensorRT *bindings* wheel (downloaded with ``pip download --no-deps``;
about 1.3 MB, no CUDA needed) or the path of one already downloaded. It writes
``tests/data/tensorrt_api/tensorrt-<version>.txt``: one name a line, sorted, after a header saying where
they come from.

How the names are read, and why this way: the bindings are a pybind11 extension module
(``tensorrt_bindings/tensorrt.so``) plus a small ``__init__.py``; the wheel ships no ``.pyi`` stubs, and
importing the module needs the TensorRT libraries (a GB-sized wheel) and a CUDA driver. pybind11 registers
every class, method, property and enum member under its name given as a C string literal
(``.def("set_output_type", ...)``, ``.value("FP16", ...)``), so every name the module exposes is a
NUL-terminated string in the binary. The names recorded are those strings that are Python identifiers
(C++ mangled symbols, ``_Z...``, left out), plus the top-level names ``__init__.py`` defines
(``nptype``, ``__version__``, ...). Two properties of this list, both safe for a guard:

* a name the module has is always in it (registration needs the literal);
* the linker shares the tail of equal strings (``INT8`` may be stored only as the end of ``UINT8``), so
  the test counts a name as present when it is a recorded string or the end of one. A removed name that
  is also the tail of another name can therefore go unnoticed; a present name is never reported missing.

Removed in 11.x and absent from its list (checked): ``FP16``, ``OBEY_PRECISION_CONSTRAINTS``,
``set_output_type``, ``precision``, ``int8_calibrator``; all present in 10.12's.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent.parent / "tests" / "data" / "tensorrt_api"
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,79}")


def binary_names(data: bytes) -> set[str]:
    """NUL-terminated printable strings of a shared object that are Python identifiers (not mangled symbols)."""
    strings = (m.group().decode() for m in re.finditer(rb"[\x20-\x7e]{2,}(?=\x00)", data))
    return {s for s in strings if IDENTIFIER.fullmatch(s) and not s.startswith("_Z")}


def python_names(source: str) -> set[str]:
    """Top-level names a module's Python source defines."""
    names: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def wheel_api(wheel: Path) -> tuple[str, set[str]]:
    """(TensorRT version, names) of a bindings wheel."""
    with zipfile.ZipFile(wheel) as zf:
        members = zf.namelist()
        so = [m for m in members if re.fullmatch(r"[^/]+/tensorrt[^/]*\.so", m)]
        if len(so) != 1:
            raise SystemExit(f"{wheel.name}: expected one <package>/tensorrt*.so, found {so or 'none'}")
        init = so[0].rsplit("/", 1)[0] + "/__init__.py"
        source = zf.read(init).decode()
        names = binary_names(zf.read(so[0])) | python_names(source)
    version = re.search(r'^__version__\s*=\s*"([^"]+)"', source, re.M)
    if not version:
        raise SystemExit(f"{wheel.name}: no __version__ in {init}")
    return version.group(1), names


def fetch(requirement: str, directory: Path) -> Path:
    if Path(requirement).is_file():
        return Path(requirement)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(directory),
                    requirement], check=True)
    wheels = sorted(directory.glob("*.whl"), key=lambda p: p.stat().st_mtime)
    return wheels[-1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheels", nargs="+", help="bindings wheel requirements (tensorrt-cu13-bindings==11.4.0.106) or paths")
    parser.add_argument("--output-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for requirement in args.wheels:
            wheel = fetch(requirement, Path(tmp))
            version, names = wheel_api(wheel)
            digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
            out = args.output_dir / f"tensorrt-{version}.txt"
            header = (f"# TensorRT {version} Python API names, from {wheel.name} (sha256 {digest})\n"
                      f"# by scripts/tensorrt-api-names.py: identifiers among the strings of the pybind11 module, plus\n"
                      f"# the names its __init__.py defines. A name is present if it is listed or the end of a listed one.\n")
            tmp_out = out.with_name(out.name + ".tmp")
            tmp_out.write_text(header + "".join(f"{n}\n" for n in sorted(names)))
            tmp_out.replace(out)
            print(f"{out}: {len(names)} names")


if __name__ == "__main__":
    main()
