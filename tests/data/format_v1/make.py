"""Writes tests/data/format_v1/ckpt and tests/data/format_v1/manager with the
code of the commit that made them (run from the repository root):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        .venv/bin/python tests/data/format_v1/make.py

The files are committed as test data: tests/test_compat.py restores them with
the current code, bit for bit, and checks that the current code writes the
same bytes for the same tree.
"""

import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import jaxckpt  # noqa: E402
import compat_tree  # noqa: E402


def main() -> None:
    ck = os.path.join(HERE, "ckpt")
    mgr_dir = os.path.join(HERE, "manager")
    for d in (ck, mgr_dir):
        shutil.rmtree(d, ignore_errors=True)
    jaxckpt.save(ck, compat_tree.build(), metadata=compat_tree.METADATA)
    with jaxckpt.CheckpointManager(mgr_dir, max_to_keep=2, save_on_preemption=False) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": compat_tree.build()["jax"]["rows"], "step": step}, epoch=step // 2,
                     metrics={"loss": 1.0 / step}, metadata={"run": "compat"})
    print("wrote", ck, "and", mgr_dir)


if __name__ == "__main__":
    main()
