"""The package's shape, checked (issue 15): layers import only downwards, no
module uses another's private names, modules and functions stay small, and a
few facts live in one place only. docs/ARCHITECTURE.md draws the same layers.
"""

from __future__ import annotations

import ast
import pathlib
import re

PKG = pathlib.Path(__file__).resolve().parent.parent / "jaxckpt"

# Lowest first. A module may import modules of its own layer or of layers below.
LAYERS: list[set[str]] = [
    {"errors", "version", "config", "gcpause", "arrayinfo", "display", "libc", "procs", "memory", "progress",
     "multihost", "prefetch"},
    {"tree"},                                          # pytree flattening
    {"snapshot", "hostcopy", "accelcopy"},             # device -> host
    {"format", "crypto"},                              # manifest <-> bytes, pure; encryption
    {"storage", "location", "posix", "posixdirs", "posixfs", "lock",
     "objclient", "objfiles", "objstore", "objlock", "obstoreclient", "s3client", "azclient", "awsprofile", "gcsclient", "gcsread",
     "gcsupload"},  # bytes <-> files (objects), the commit
    {"fmt_mindspore", "fmt_mindspore_crypto", "fmt_mindspore_write", "fmt_safetensors", "fmt_flax", "fmt_orbax"},  # foreign formats' files <-> flat dicts
    {"layout", "manifests", "writer", "readplan", "reader", "placement", "localcopy"},  # thread pools; host -> device
    {"checkpointer", "targets", "api", "verify"},      # the functional API, AsyncCheckpointer; verifying
    {"interop"},                                       # every format behind the public functions, convert
    {"policies", "steps", "saving", "preemption", "manager", "interval", "dataiter"},  # when to save, what to keep
    {"__init__"},                                      # the public face
    {"cli", "__main__"},                               # the command line, over the public face
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}

MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 50
MAX_CLASS_LINES = 300
LONG_OK = "# long:"  # a longer function says why in a comment starting like this


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PKG.glob("*.py"))}


def _imports(tree: ast.Module) -> dict[str, set[str]]:
    """jaxckpt modules imported (module -> the local names bound to it)."""
    out: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "jaxckpt":
            for a in node.names:
                out.setdefault(a.name, set()).add(a.asname or a.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxckpt."):
            out.setdefault(node.module.split(".")[1], set())
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("jaxckpt."):
                    out.setdefault(a.name.split(".")[1], set())
                elif a.name == "jaxckpt":
                    out.setdefault("__init__", set())
    return out


def test_every_module_has_a_layer():
    assert sorted(set(_modules()) - set(RANK)) == []


def test_no_module_imports_a_layer_above_its_own():
    bad = []
    for name, tree in _modules().items():
        for dep in _imports(tree):
            if RANK.get(dep, -1) > RANK[name]:
                bad.append(f"{name} (layer {RANK[name]}) imports {dep} (layer {RANK[dep]})")
    assert bad == []


def test_no_private_name_of_another_module_is_used():
    bad = []
    for name, tree in _modules().items():
        aliases = {alias: dep for dep, names in _imports(tree).items() for alias in names}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxckpt"):
                bad += [f"{name}: from {node.module} import {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert bad == []


def test_modules_functions_and_classes_stay_small():
    bad = []
    for p in sorted(PKG.glob("*.py")):
        lines = p.read_text().splitlines()
        if len(lines) > MAX_MODULE_LINES:
            bad.append(f"{p.name}: {len(lines)} lines")
        for node in ast.walk(ast.parse("\n".join(lines))):
            size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.ClassDef) and size > MAX_CLASS_LINES:
                bad.append(f"{p.name}:{node.lineno} class {node.name}: {size} lines")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and size > MAX_FUNCTION_LINES:
                body = lines[node.lineno - 1:node.end_lineno]
                if not any(line.strip().lower().startswith(LONG_OK) for line in body):
                    bad.append(f"{p.name}:{node.lineno} {node.name}(): {size} lines")
    assert bad == []


def test_the_manifest_file_name_is_spelled_in_format_only():
    found = [f"{p.name}:{i}" for p in sorted(PKG.glob("*.py")) if p.name != "format.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if "manifest.msgpack" in line]
    assert found == []


def test_one_libc_loader():
    found = [p.name for p in sorted(PKG.glob("*.py")) if re.search(r"ctypes\.CDLL\(", p.read_text())]
    assert found == ["libc.py"]
