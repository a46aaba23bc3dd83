"""Interrupted-and-resumed training with jaxckpt's CheckpointManager.

    python -m examples.demo                      # a simulated failure (an exception) at step 150
    python -m examples.demo --interrupt sigterm  # a preemption (SIGTERM) at step 150

A small Flax (linen) MLP learns a regression task with optax on the CPU, fed
by a grain pipeline that shuffles a small in-memory dataset (reshuffled every
epoch). The demo runs three things, each in a fresh process where it matters:

1. run 1 trains with a ``CheckpointManager`` (async saves every 50 steps,
   ``max_to_keep=3``, ``save_on_exception=True``), passing it the data
   iterator at every ``save()``, and is interrupted part-way: by an exception
   after the step's batch was drawn (the manager saves the last state, and
   the iterator's state at that ``save()``, as an "exception" checkpoint, then
   the process dies) or by SIGTERM (the manager saves at the next step as a
   "preemption" checkpoint and the loop exits cleanly);
2. run 2, a new process, resumes from the latest committed checkpoint (the
   arrays, and the data iterator's position) and finishes the run;
3. an uninterrupted run of the same training, for comparison.

It prints the loss before and after the interruption, then checks that the
state run 2 restored is bit-identical to the state run 1 saved, that every
batch run 2 drew after the resume is bit-identical to the uninterrupted run's
batch of that step, and that the resumed losses equal the uninterrupted run's
bit for bit.

Files go to ``--dir`` (default ``demo_run/``): ``ckpt/`` (the checkpoints) and
``run1.json`` / ``run2.json`` (each run's losses, batch digests and state
fingerprint).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from typing import Any

MARKER = ".jaxckpt-demo"


# ----------------------------------------------------------------------------- the training task
EXAMPLES, BATCH = 4096, 256


def make_task():
    """Model, optimizer, initial state, train step and the input pipeline; all deterministic."""
    import flax.linen as nn
    import grain
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax.training import train_state

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.tanh(nn.Dense(64)(x))
            x = nn.tanh(nn.Dense(64)(x))
            return nn.Dense(1)(x)[..., 0]

    model = MLP()
    teacher = jax.random.normal(jax.random.key(1), (8,)) / 2
    x = jax.random.normal(jax.random.key(2), (EXAMPLES, 8))
    records = np.asarray(jnp.concatenate([x, jnp.sin(x @ teacher)[:, None]], axis=1))  # features | target

    def batches():
        """A fresh iterator over the shuffled, repeated dataset, in batches (rows: 8 features, then the target)."""
        ds = grain.MapDataset.source(records).shuffle(seed=3).repeat().batch(BATCH, drop_remainder=True)
        return iter(ds.to_iter_dataset())

    def create_state():
        params = model.init(jax.random.key(0), jnp.zeros((1, 8)))
        state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(3e-3))
        return state.replace(step=jnp.asarray(0, jnp.int32))

    @jax.jit
    def train_step(state, x, y):
        def loss_fn(params):
            return jnp.mean((state.apply_fn(params, x) - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    return create_state, train_step, batches


_TASK = None


def _task():
    global _TASK
    if _TASK is None:
        _TASK = make_task()
    return _TASK


def digest(batch: Any) -> str:
    """A short sha256 of one batch's bytes."""
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(batch).tobytes()).hexdigest()[:16]


def fingerprint(tree: Any) -> str:
    """sha256 over every leaf's key path, dtype, shape and bytes."""
    import jax
    import numpy as np

    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}:{a.dtype.str}:{a.shape};".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class SimulatedFailure(RuntimeError):
    """What run 1 raises part-way (a NaN check, a lost host, ...)."""


# ----------------------------------------------------------------------------- one training process
def train(directory: str, steps: int, save_every: int, fail_at: int, interrupt: str, report: str,
          reference: bool) -> None:
    """One training process; writes its losses and state fingerprints to ``report``
    (and, with ``reference``, the losses of an uninterrupted run of the same training)."""
    import jax

    import jaxckpt

    logging.basicConfig(stream=sys.stdout, format="  %(name)s: %(message)s")
    logging.getLogger("jaxckpt").setLevel(logging.INFO)
    create_state, train_step, batches = _task()
    losses: dict[int, float] = {}
    result: dict[str, Any] = {"losses": losses, "batches": {}}
    data = batches()
    try:
        with jaxckpt.CheckpointManager(directory, save_interval_steps=save_every, max_to_keep=3,
                                       save_on_exception=True) as mgr:
            start = mgr.latest_step()
            if start is None:
                state, start = create_state(), 0
            else:  # the arrays, and the pipeline's position as run 1 saved it with that step
                state = mgr.restore(target=jax.eval_shape(create_state), data_iterator=data)
                result["resumed_from"] = start
                result["resumed_fingerprint"] = fingerprint(state)
                print(f"resumed from step {start} ({mgr.metadata(start).reason} checkpoint)", flush=True)
                print(f"data iterator restored to {mgr.data_iterator_state(start)}", flush=True)
            for step in range(start + 1, steps + 1):
                if step == fail_at and interrupt == "sigterm":
                    print(f"step {step}: SIGTERM arrives (a preemption notice from the scheduler)", flush=True)
                    os.kill(os.getpid(), signal.SIGTERM)
                batch = next(data)
                result["batches"][step] = digest(batch)
                if step == fail_at and interrupt == "exception":  # after its batch was drawn
                    raise SimulatedFailure(f"simulated failure at step {step}")
                state, loss = train_step(state, batch[:, :8], batch[:, 8])
                losses[step] = float(loss)
                result["last_step"] = step
                mgr.save(step, state, data_iterator=data, metrics={"loss": loss},
                         force=step == steps)  # the final state, always
                if step % 25 == 0 or step == steps:
                    print(f"step {step:4d}  loss {losses[step]:.6f}", flush=True)
                if mgr.reached_preemption(step):
                    print(f"step {step}: preemption checkpoint committed, exiting cleanly", flush=True)
                    break
    finally:
        if "last_step" in result:
            result["last_fingerprint"] = fingerprint(state)
        with open(report, "w") as f:
            json.dump(result, f)
    if reference:  # in this process the train step is compiled already
        result["reference"], result["reference_batches"] = reference_run(steps)
        with open(report, "w") as f:
            json.dump(result, f)


def reference_run(steps: int) -> tuple[dict[int, float], dict[int, str]]:
    """The same training, never interrupted, no checkpoints: (losses, batch digests)."""
    create_state, train_step, batches = _task()
    state, losses, seen, data = create_state(), {}, {}, batches()
    for step in range(1, steps + 1):
        batch = next(data)
        seen[step] = digest(batch)
        state, loss = train_step(state, batch[:, :8], batch[:, 8])
        losses[step] = float(loss)
    return losses, seen


# ----------------------------------------------------------------------------- the orchestration
def _prepare(root: str) -> None:
    if os.path.exists(root) and os.listdir(root):
        if not os.path.exists(os.path.join(root, MARKER)):
            sys.exit(f"{root} exists and was not made by this demo; pass another --dir")
        shutil.rmtree(root)
    os.makedirs(root)
    open(os.path.join(root, MARKER), "w").close()


def _run_phase(label: str, args: argparse.Namespace, report: str, fail_at: int) -> int:
    """Run one training process (``fail_at=0``: no interruption, then the reference run), relaying its output."""
    cmd = [sys.executable, "-m", "examples.demo", "--phase", "train", "--dir", args.dir, "--steps", str(args.steps),
           "--save-every", str(args.save_every), "--interrupt", args.interrupt, "--report", report,
           "--fail-at", str(fail_at)] + ([] if fail_at else ["--reference"])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root)
    for line in proc.stdout:
        print(f"[{label}] {line.rstrip()}", flush=True)
    err = proc.stderr.read()
    proc.wait()
    if proc.returncode != 0:
        last = ([ln for ln in err.splitlines() if ln.strip()] or [""])[-1]
        print(f"[{label}] the process died (exit status {proc.returncode}): {last}")
        if "SimulatedFailure" not in last:
            print(err, file=sys.stderr)
    return proc.returncode


def _list_checkpoints(ckpt_dir: str) -> None:
    import jaxckpt

    with jaxckpt.CheckpointManager(ckpt_dir, read_only=True) as ro:
        for step in ro.all_steps():
            m = ro.metadata(step)
            print(f"  step {step:4d}  {m.reason:<10}  loss {m.metrics['loss']:.6f}  {os.path.basename(m.path)}/")


def orchestrate(args: argparse.Namespace) -> int:
    root = os.path.abspath(args.dir)
    _prepare(root)
    args.dir = os.path.join(root, "ckpt")
    how = "a simulated failure (exception)" if args.interrupt == "exception" else "a preemption (SIGTERM)"
    print(f"jaxckpt demo: a Flax MLP trained for {args.steps} steps on a shuffled grain pipeline "
          f"({EXAMPLES} examples, batches of {BATCH}), interrupted by {how} at step {args.fail_at}, "
          f"then resumed.\ncheckpoints: {args.dir}\n")
    print("== run 1: train, saving asynchronously every", args.save_every, "steps (max_to_keep=3) ==")
    rc1 = _run_phase("run 1", args, os.path.join(root, "run1.json"), args.fail_at)
    print("\n== committed checkpoints after the interruption ==")
    _list_checkpoints(args.dir)
    print("\n== run 2: a fresh process resumes from the latest checkpoint ==")
    rc2 = _run_phase("run 2", args, os.path.join(root, "run2.json"), 0)
    with open(os.path.join(root, "run1.json")) as f:
        run1 = json.load(f)
    with open(os.path.join(root, "run2.json")) as f:
        run2 = json.load(f)
    ref = {int(k): v for k, v in run2.get("reference", {}).items()}
    print("\n== an uninterrupted run of the same training, without checkpoints (run by run 2's process) ==")
    print(f"  {len(ref)} steps, final loss {ref.get(args.steps, float('nan')):.6f}")
    return _report(args, rc1, rc2, run1, run2, ref)


def _same_batches(run1: dict, run2: dict) -> bool:
    """Every batch either run drew equals the uninterrupted run's batch of that step, and run 2 drew some."""
    ref = run2.get("reference_batches", {})
    return bool(run2["batches"]) and all(ref.get(k) == v for run in (run1, run2) for k, v in run["batches"].items())


def _report(args, rc1: int, rc2: int, run1: dict, run2: dict, ref: dict[int, float]) -> int:
    l1 = {int(k): v for k, v in run1["losses"].items()}
    l2 = {int(k): v for k, v in run2["losses"].items()}
    resumed = run2.get("resumed_from")
    print("\n== the loss curve continues where it stopped ==")
    print(f"  {'step':>5}  {'run 1':>10}  {'run 2':>10}  {'uninterrupted':>13}")
    shown = sorted({s for s in l1 if s % 25 == 0} | {max(l1, default=0)} | {s for s in l2 if s % 25 == 0}
                   | ({resumed + 1} if resumed is not None else set()) | {args.steps})
    for s in shown:
        a = f"{l1[s]:.6f}" if s in l1 else "-"
        b = f"{l2[s]:.6f}" if s in l2 else "-"
        note = "   <- run 1 stopped here" if s == max(l1, default=None) else (
            "   <- run 2 resumed here" if resumed is not None and s == resumed + 1 else "")
        print(f"  {s:5d}  {a:>10}  {b:>10}  {ref.get(s, float('nan')):>13.6f}{note}")
    checks = {
        "run 1 was interrupted as planned": (rc1 != 0) if args.interrupt == "exception" else (rc1 == 0),
        f"run 2 resumed from the {args.interrupt} checkpoint at step {run1.get('last_step')}":
            resumed is not None and resumed == run1.get("last_step"),
        "the state restored by run 2 is bit-identical to the state run 1 saved":
            run2.get("resumed_fingerprint") == run1.get("last_fingerprint"),
        "run 2 finished the run": rc2 == 0 and max(l2, default=-1) == args.steps,
        "the batches after the resume equal the uninterrupted run's, bit for bit": _same_batches(run1, run2),
        "the resumed losses equal the uninterrupted run's, bit for bit": bool(l2) and all(
            l2[s] == ref.get(s) for s in l2) and all(l1[s] == ref.get(s) for s in l1),
    }
    print()
    for what, ok in checks.items():
        print(f"  {'OK    ' if ok else 'FAILED'} {what}")
    return 0 if all(checks.values()) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="demo_run", help="working directory (default: demo_run/)")
    p.add_argument("--steps", type=int, default=300, help="training steps in all (default 300)")
    p.add_argument("--fail-at", type=int, default=150, help="step at which run 1 is interrupted (default 150)")
    p.add_argument("--save-every", type=int, default=50, help="save interval in steps (default 50)")
    p.add_argument("--interrupt", choices=("exception", "sigterm"), default="exception")
    p.add_argument("--phase", choices=("all", "train"), default="all", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    p.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase == "train":
        train(args.dir, args.steps, args.save_every, args.fail_at, args.interrupt, args.report, args.reference)
        return 0
    if not 1 < args.fail_at <= args.steps:
        p.error("--fail-at must be in (1, --steps]")
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
