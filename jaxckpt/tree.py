"""Pytree flattening: leaves and key paths in, a format-level tree description out.

The training thread only calls :func:`flatten` (JAX's C++ flattener). The
description of containers (kinds, keys, type names) and the leaf key paths are
derived later, on a background thread, from the ``PyTreeDef`` alone
(:func:`describe`), so that the caller may mutate its containers right after a
save returns.
"""

from __future__ import annotations

from typing import Any, Callable

from jax import tree_util

from jaxckpt.errors import CorruptCheckpointError

SEP = "/"


def flatten(tree: Any) -> tuple[list[Any], Any]:
    """Leaves in JAX's canonical order and the tree definition."""
    return tree_util.tree_flatten(tree)


def key_str(entry: Any) -> str:
    """One key-path entry as a string: dict key, list index, attribute name."""
    if isinstance(entry, tree_util.DictKey):
        return str(entry.key)
    if isinstance(entry, tree_util.SequenceKey):
        return str(entry.idx)
    if isinstance(entry, tree_util.GetAttrKey):
        return entry.name
    if isinstance(entry, tree_util.FlattenedIndexKey):
        return str(entry.key)
    return str(entry).strip(".[]'\"")


def _key_value(entry: Any) -> str | int:
    if isinstance(entry, tree_util.DictKey):
        return entry.key if isinstance(entry.key, (str, int)) else str(entry.key)
    if isinstance(entry, tree_util.SequenceKey):
        return entry.idx
    if isinstance(entry, tree_util.FlattenedIndexKey):
        return entry.key
    return key_str(entry)


def path_str(path: tuple) -> str:
    """A key path as the flat key used by load_checkpoint: ``params/Dense_0/kernel``."""
    return SEP.join(key_str(e) for e in path)


def leaf_paths(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> tuple[list[str], list[Any], Any]:
    """Flat key strings, leaves and treedef of a (target) tree."""
    with_path, treedef = tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [path_str(p) for p, _ in with_path], [x for _, x in with_path], treedef


def _type_name(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def _children(node: Any) -> list[tuple[Any, Any]]:
    """Immediate children of a pytree node with their key entries."""
    with_path, _ = tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    return [(p[0], x) for p, x in with_path]


def _container(node: Any, kids: list[tuple[Any, Any]], children: list[Any]) -> dict:
    """The description of a node read through JAX (its key entries ``kids``)."""
    if isinstance(node, dict):
        return {"t": "dict", "k": [_key_value(e) for e, _ in kids], "c": children}
    if type(node) is list:
        return {"t": "list", "c": children}
    if type(node) is tuple:
        return {"t": "tuple", "c": children}
    keys = [_key_value(e) for e, _ in kids]
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return {"t": "namedtuple", "n": _type_name(type(node)), "k": keys, "c": children}
    return {"t": "custom", "n": _type_name(type(node)), "k": keys, "c": children}


def describe(treedef: Any) -> tuple[Any, list[str]]:
    """The manifest's tree description and the leaf key paths, from a treedef.

    Containers are rebuilt with integer placeholders (``treedef.unflatten``),
    then walked one level at a time. Leaves become their index; containers a
    map ``{"t": kind, "c": children[, "k": keys][, "n": type name]}``.
    """
    skeleton = treedef.unflatten(range(treedef.num_leaves))
    paths: list[str] = [""] * treedef.num_leaves

    def walk(node: Any, prefix: str) -> Any:
        t = type(node)
        if t is int:
            paths[node] = prefix
            return node
        if node is None:
            return {"t": "none"}
        # Plain dicts, lists and tuples (most of a training state, and all of a
        # 10,000-leaf one) are read directly: the skeleton's dicts hold their
        # keys in JAX's flattening order, the one ``_children`` would give.
        if t is dict:
            keys = list(node)
            sep = f"{prefix}{SEP}" if prefix else ""
            children = [walk(node[k], sep + (k if type(k) is str else str(k))) for k in keys]
            return {"t": "dict", "k": [k if isinstance(k, (str, int)) else str(k) for k in keys], "c": children}
        if t is list or t is tuple:
            sep = f"{prefix}{SEP}" if prefix else ""
            return {"t": t.__name__, "c": [walk(x, sep + str(i)) for i, x in enumerate(node)]}
        # Every other node: its children and keys as JAX flattens it.
        kids = _children(node)
        join = (lambda k: f"{prefix}{SEP}{k}") if prefix else (lambda k: k)
        return _container(node, kids, [walk(x, join(key_str(e))) for e, x in kids])

    return walk(skeleton, ""), paths


def build(tree: Any, leaves: list[Any]) -> Any:
    """Rebuild plain containers from a manifest tree description (no target).

    dict/list/tuple come back as such; NamedTuples and custom nodes
    (``flax.struct.dataclass``, ``nnx.State``...) as dicts keyed by field name.
    Iterative, so hostile depth cannot exhaust the C stack (depth is also
    capped by the format decoder).
    """
    def make(node: Any, kids: list[Any]) -> Any:
        t = node["t"]
        if t == "list":
            return kids
        if t == "tuple":
            return tuple(kids)
        return dict(zip(node["k"], kids))

    # post-order traversal with an explicit stack
    result: list[Any] = []
    stack: list[tuple[Any, bool]] = [(tree, False)]
    while stack:
        node, expanded = stack.pop()
        if isinstance(node, int):
            result.append(leaves[node])
        elif node["t"] == "none":
            result.append(None)
        elif not expanded:
            stack.append((node, True))
            stack.extend((ch, False) for ch in reversed(node["c"]))
        else:
            n = len(node["c"])
            kids = result[len(result) - n:] if n else []
            del result[len(result) - n:]
            result.append(make(node, kids))
    if len(result) != 1:
        raise CorruptCheckpointError("manifest tree is malformed")
    return result[0]



def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Nested dicts from a flat dict whose keys are key paths joined with ``/``
    (the inverse of a flat view; every container comes back as a dict)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        parts = str(key).split("/")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"key {key!r}: {'/'.join(parts[:i + 1])!r} is a leaf and a container")
            node = child
        if parts[-1] in node:
            raise ValueError(f"key {key!r}: a leaf and a container, or given twice")
        node[parts[-1]] = value
    return out
