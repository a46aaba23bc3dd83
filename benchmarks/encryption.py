"""Encryption at rest (issue 18): encrypted vs plain saves and restores, side by side.

    python -m benchmarks.encryption [--workloads W1,W2,W3] [--rounds 3] [--quick]

For each workload and round, in fresh processes, interleaved (plain, then
encrypted, alternating which goes first): an ``AsyncCheckpointer`` save
(blocking time, and total time until committed) and a cold restore (page
cache dropped first, where this user may) into the same structure. Reported:
medians and the encrypted / plain ratios against the targets (blocking time
unchanged; W1/W3 total save <= 1.2x, cold restore <= 1.3x; W2 save and restore
<= 1.3x). Results go to benchmarks/results/<timestamp>-encryption.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCRATCH = os.path.join(HERE, ".scratch", "encryption")
KEY_HEX = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, {root!r})
from benchmarks import measure, workloads
import jaxckpt
name, quick, path, enc = sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4] == "1"
key = bytes.fromhex({key!r}) if enc else None
w = workloads.get(name, quick=quick)
state = workloads.build_state(w)
with jaxckpt.AsyncCheckpointer(encryption_key=key) as ck:
    t0 = time.perf_counter()
    h = ck.save(path, state)
    blocking = time.perf_counter() - t0
    h.result()
    total = time.perf_counter() - t0
del state
cold = measure.drop_caches()
t0 = time.perf_counter()
out = jaxckpt.restore(path, workloads.abstract_state(w), encryption_key=key)
import jax
jax.block_until_ready(out)
restore = time.perf_counter() - t0
print(json.dumps({{"blocking": blocking, "total": total, "restore": restore, "cold": cold}}))
"""


def _run(name: str, quick: bool, enc: bool, path: str) -> dict:
    code = CHILD.format(root=os.path.dirname(HERE), key=KEY_HEX)
    out = subprocess.run([sys.executable, "-c", code, name, "1" if quick else "0", path, "1" if enc else "0"],
                         capture_output=True, text=True, check=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    return json.loads(out.stdout.strip().splitlines()[-1])


TARGETS = {"W1": {"total": 1.2, "restore": 1.3}, "W3": {"total": 1.2, "restore": 1.3},
           "W2": {"total": 1.3, "restore": 1.3}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default="W1,W2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    results: dict = {}
    for name in args.workloads.split(","):
        runs: dict = {"plain": [], "encrypted": []}
        for r in range(args.rounds):
            order = [False, True] if r % 2 == 0 else [True, False]
            for enc in order:
                path = os.path.join(SCRATCH, f"{name}-{r}-{int(enc)}")
                shutil.rmtree(path, ignore_errors=True)
                os.makedirs(SCRATCH, exist_ok=True)
                runs["encrypted" if enc else "plain"].append(_run(name, args.quick, enc, path))
                shutil.rmtree(path, ignore_errors=True)
        med = {k: {m: statistics.median(x[m] for x in v) for m in ("blocking", "total", "restore")}
               for k, v in runs.items()}
        ratios = {m: med["encrypted"][m] / med["plain"][m] for m in ("blocking", "total", "restore")}
        results[name] = {"runs": runs, "median": med, "ratio": ratios, "cold": all(x["cold"] for v in runs.values()
                                                                               for x in v)}
    stamp = time.strftime("%Y%m%dT%H%M%S")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    base = os.path.join(HERE, "results", f"{stamp}-encryption")
    with open(base + ".json", "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=2)
    lines = [f"# Encryption at rest, {stamp} (`python -m benchmarks.encryption --workloads {args.workloads} "
             f"--rounds {args.rounds}{' --quick' if args.quick else ''}`)", "",
             "| workload | | plain (median) | encrypted (median) | encrypted / plain | target |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        for m, label in (("blocking", "blocking"), ("total", "total save"), ("restore",
                                                                             "restore" + (" (cold)" if r["cold"] else " (warm: caches not dropped)"))):
            t = TARGETS.get(name, {}).get(m)
            ok = "" if t is None else (f"<= {t}x: {'met' if r['ratio'][m] <= t else 'NOT met'}")
            lines.append(f"| {name} | {label} | {r['median']['plain'][m]:.3f} s | {r['median']['encrypted'][m]:.3f} s "
                         f"| {r['ratio'][m]:.2f}x | {ok or 'unchanged within noise'} |")
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
