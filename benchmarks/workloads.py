"""Benchmark workloads: deterministic pytrees described by leaf specs.

A workload is a flat tuple of `LeafSpec`s; the nested dict is built from the
leaf paths.  Contents are a pure function of (workload, seed, leaf index), so
a restore process can regenerate any leaf to check a restore bit for bit
without the save process having to hand anything over.

Float leaves are scaled slices of one shared pool of standard-normal float32
numbers (128 MiB at most) taken at a per-leaf random offset, wrapping around.
Drawing 4 GB of fresh normals would cost ~15 s per process on a 2-core VM;
slicing the pool costs one memory pass.  The data keep the statistics of
real weights (random mantissas, ~8% compressible by zstd) and no two leaves
start at the same offset.  No checkpointer deduplicates across tens of MiB,
so the shared pool does not flatter anyone.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator

import numpy as np

POOL_FLOATS = 32 << 20  # 128 MiB of float32
VOCAB = 32768
MAX_POS = 2048


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """One array of a workload: where it sits, what it holds."""

    path: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    kind: str = "normal"  # "normal" (bias + scale * N(0,1)), "const" or "rng"
    scale: float = 0.02
    bias: float = 0.0

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    @property
    def key(self) -> str:
        return "/".join(self.path)


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    leaves: tuple[LeafSpec, ...]
    quick: bool = False
    seed: int = 0

    @property
    def nbytes(self) -> int:
        return sum(leaf.nbytes for leaf in self.leaves)

    @functools.cached_property
    def pool_floats(self) -> int:
        """Size of the shared pool that float leaves are sliced from."""
        floats = sum(leaf.nbytes // 4 for leaf in self.leaves if leaf.kind == "normal")
        return max(1, min(POOL_FLOATS, floats))

    def describe(self) -> dict:
        largest = max(self.leaves, key=lambda leaf: leaf.nbytes)
        return {
            "name": self.name,
            "quick": self.quick,
            "seed": self.seed,
            "leaves": len(self.leaves),
            "bytes": self.nbytes,
            "largest_leaf": largest.key,
            "largest_leaf_bytes": largest.nbytes,
        }


# --------------------------------------------------------------------------
# Workload definitions (see /work/shared/ANCHORS.md for W1/W2/W3)


def _dense(prefix: tuple[str, ...], d_in: int, d_out: int) -> list[LeafSpec]:
    return [
        LeafSpec(prefix + ("kernel",), (d_in, d_out), "float32", scale=d_in**-0.5),
        LeafSpec(prefix + ("bias",), (d_out,), "float32", scale=0.01),
    ]


def _layer_norm(prefix: tuple[str, ...], d: int) -> list[LeafSpec]:
    return [
        LeafSpec(prefix + ("scale",), (d,), "float32", scale=0.05, bias=1.0),
        LeafSpec(prefix + ("bias",), (d,), "float32", scale=0.01),
    ]


def _block(i: int, d: int) -> list[LeafSpec]:
    """16 leaves: 4 attention projections, a 4x MLP and two layer norms."""
    p = ("params", f"layer_{i:02d}")
    leaves = _layer_norm(p + ("ln1",), d)
    for name in ("query", "key", "value", "out"):
        leaves += _dense(p + ("attn", name), d, d)
    leaves += _layer_norm(p + ("ln2",), d)
    leaves += _dense(p + ("mlp", "fc1"), d, 4 * d)
    leaves += _dense(p + ("mlp", "fc2"), 4 * d, d)
    return leaves


def transformer(name: str, layers: int, d_model: int, vocab: int = VOCAB,
                max_pos: int = MAX_POS, quick: bool = False) -> Workload:
    """A decoder-only transformer train state: 16 leaves per layer + 8."""
    leaves = [
        LeafSpec(("params", "embed", "embedding"), (vocab, d_model), "float32"),
        LeafSpec(("params", "pos_embed", "embedding"), (max_pos, d_model), "float32"),
    ]
    for i in range(layers):
        leaves += _block(i, d_model)
    leaves += _layer_norm(("params", "final_ln"), d_model)
    leaves += [
        LeafSpec(("step",), (), "int32", kind="const"),
        LeafSpec(("epoch",), (), "int32", kind="const"),
        LeafSpec(("tokens_seen",), (), "int32", kind="const"),
        LeafSpec(("rng",), (2,), "uint32", kind="rng"),
    ]
    return Workload(name, tuple(leaves), quick=quick)


def many_vectors(name: str, groups: int, per_group: int, seed: int = 0,
                 quick: bool = False) -> Workload:
    """groups x per_group nested dict of float32 vectors of 1-16 KiB."""
    sizes = np.random.default_rng([seed, 7]).integers(256, 4096, size=groups * per_group,
                                                      endpoint=True)
    leaves = [
        LeafSpec((f"g{g:03d}", f"v{v:03d}"), (int(sizes[g * per_group + v]),), "float32",
                 scale=1.0)
        for g in range(groups)
        for v in range(per_group)
    ]
    return Workload(name, tuple(leaves), quick=quick, seed=seed)


_FULL: dict[str, Callable[[], Workload]] = {
    "W1": lambda: transformer("W1", layers=12, d_model=1280),
    "W2": lambda: many_vectors("W2", 100, 100),
    "W3": lambda: transformer("W3", layers=24, d_model=1856),
}
_QUICK: dict[str, Callable[[], Workload]] = {
    "W1": lambda: transformer("W1", layers=2, d_model=256, vocab=4096, max_pos=256,
                              quick=True),
    "W2": lambda: many_vectors("W2", 10, 20, quick=True),
    "W3": lambda: transformer("W3", layers=4, d_model=384, vocab=4096, max_pos=256,
                              quick=True),
}
NAMES = tuple(_FULL)


def get(name: str, quick: bool = False) -> Workload:
    table = _QUICK if quick else _FULL
    if name not in table:
        raise ValueError(f"unknown workload {name!r}; expected one of {', '.join(NAMES)}")
    return table[name]()


# --------------------------------------------------------------------------
# Contents


@functools.lru_cache(maxsize=2)
def _pool(seed: int, floats: int) -> np.ndarray:
    return np.random.default_rng([seed, 0x9E37]).standard_normal(floats, dtype=np.float32)


def _fill_normal(out: np.ndarray, pool: np.ndarray, offset: int, spec: LeafSpec) -> None:
    flat = out.reshape(-1)
    done = 0
    while done < flat.size:
        take = min(flat.size - done, pool.size - offset)
        np.multiply(pool[offset:offset + take], np.float32(spec.scale),
                    out=flat[done:done + take])
        done += take
        offset = 0
    if spec.bias:
        np.add(flat, np.float32(spec.bias), out=flat)


def make_leaf(workload: Workload, index: int) -> np.ndarray:
    """The host value of leaf `index` (fresh array, deterministic)."""
    spec = workload.leaves[index]
    rng = np.random.default_rng([workload.seed, index])
    if spec.kind == "const":
        return np.asarray(rng.integers(0, 1 << 20), dtype=spec.dtype).reshape(spec.shape)
    if spec.kind == "rng":
        return rng.integers(0, 1 << 32, size=spec.shape, dtype=np.uint32)
    pool = _pool(workload.seed, workload.pool_floats)
    out = np.empty(spec.shape, dtype=spec.dtype)
    _fill_normal(out, pool, int(rng.integers(pool.size)), spec)
    return out


def host_leaves(workload: Workload) -> Iterator[tuple[LeafSpec, np.ndarray]]:
    for i, spec in enumerate(workload.leaves):
        yield spec, make_leaf(workload, i)


def nest(pairs: Iterator[tuple[tuple[str, ...], object]]) -> dict:
    """Nested dict from (path, value) pairs."""
    root: dict = {}
    for path, value in pairs:
        node = root
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return root


def build_state(workload: Workload, device=None) -> dict:
    """The workload as jax.Arrays on `device` (default: the default device).

    Leaves are made and transferred one at a time so that building needs at
    most one extra leaf of host memory on an accelerator.
    """
    import jax

    device = device or jax.devices()[0]
    return nest((spec.path, jax.device_put(value, device))
                for spec, value in host_leaves(workload))


def abstract_state(workload: Workload, device=None) -> dict:
    """ShapeDtypeStructs (with a single-device sharding) for restoring."""
    import jax

    sharding = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
    return nest((spec.path, jax.ShapeDtypeStruct(spec.shape, np.dtype(spec.dtype),
                                                 sharding=sharding))
                for spec in workload.leaves)


def flatten(tree: dict) -> dict[str, object]:
    """'a/b/c' -> leaf for a nested dict (the inverse of `nest`)."""
    out: dict[str, object] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, prefix + (str(k),))
        else:
            out["/".join(prefix)] = node

    walk(tree, ())
    return out
