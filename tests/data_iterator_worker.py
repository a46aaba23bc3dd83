"""A training process with a grain input pipeline, for tests/test_data_iterator.py.

    python tests/data_iterator_worker.py train PIPELINE WORKERS DIR STEPS SAVE_EVERY INTERRUPT AT REPORT
    python tests/data_iterator_worker.py mh SCENARIO PROCESS_ID NUM_PROCESSES PORT WORKDIR

``train``: trains a tiny model on batches of PIPELINE ("dataloader": a grain
``DataLoader``; "dataset": ``MapDataset(...).to_iter_dataset()``, with
``mp_prefetch`` when WORKERS > 0), both shuffling, with a ``CheckpointManager``
(``save_interval_steps=SAVE_EVERY``, ``save_on_exception=True``) that gets the
iterator at every ``save()``. INTERRUPT: "none" (resume from the latest step
if there is one, and run to STEPS), "reference" (no manager: the
uninterrupted run), "kill" (the save of step AT commits, three more batches
are drawn, then SIGKILL), "exception" (raised at step AT after its batch was
drawn: the exception save stores step AT-1) or "sigterm" (at step AT: the
preemption save stores step AT). Writes REPORT (JSON): each step's batch hash,
the state's fingerprint, the step resumed from.

``mh``: one process of a 2-process jax.distributed job (see SCENARIOS).

Top-level imports stay light: grain's worker processes import this module.
"""

import hashlib
import json
import os
import signal
import sys

import grain
import numpy as np

RECORDS = 512


def records():
    return (np.arange(RECORDS * 6, dtype=np.float32).reshape(RECORDS, 6) * 0.37) % 5.0


def scale(x):
    return x * 2.0 + 1.0


class Scale(grain.transforms.Map):
    def map(self, x):
        return scale(x)


def pipeline(kind, workers, seed=7, data=None):
    """A shuffling, repeating pipeline of batches of 16 records."""
    data = records() if data is None else data
    if kind == "dataloader":
        sampler = grain.samplers.IndexSampler(num_records=len(data), shard_options=grain.sharding.NoSharding(),
                                              shuffle=True, num_epochs=None, seed=seed)
        loader = grain.DataLoader(data_source=data, sampler=sampler, worker_count=workers,
                                  operations=[Scale(), grain.transforms.Batch(16, drop_remainder=True)])
        return iter(loader)
    ds = grain.MapDataset.source(data).shuffle(seed=seed).repeat().map(scale).batch(16).to_iter_dataset()
    if workers:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(ds)


def digest(batch):
    return hashlib.sha256(np.ascontiguousarray(batch).tobytes()).hexdigest()[:24]


def fingerprint(tree):
    import jax

    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(tree):
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()[:24]


def model():
    import jax
    import jax.numpy as jnp

    @jax.jit
    def step(state, batch):
        return {"w": state["w"] * 0.9 + jnp.mean(batch, axis=0), "n": state["n"] + 1}

    return {"w": jnp.zeros(6, jnp.float32), "n": jnp.int32(0)}, step


def train(kind, workers, directory, steps, save_every, interrupt, at, report):
    import jax

    import jaxckpt

    it = pipeline(kind, workers)
    state, step_fn = model()
    out = {"batches": {}, "resumed_from": None}
    if interrupt == "reference":
        for step in range(1, steps + 1):
            batch = next(it)
            out["batches"][step] = digest(batch)
            state = step_fn(state, batch)
        out["final"] = fingerprint(state)
        return out
    try:
        with jaxckpt.CheckpointManager(directory, save_interval_steps=save_every, save_on_exception=True) as mgr:
            start = mgr.latest_step() or 0
            if start:
                state = mgr.restore(target=jax.eval_shape(lambda: state), data_iterator=it)
                out["resumed_from"] = start
            out["state_type"] = type(it.get_state()).__name__
            for step in range(start + 1, steps + 1):
                if interrupt == "sigterm" and step == at:
                    os.kill(os.getpid(), signal.SIGTERM)
                batch = next(it)
                out["batches"][step] = digest(batch)
                if interrupt == "exception" and step == at:
                    raise RuntimeError(f"simulated failure at step {step}")
                state = step_fn(state, batch)
                mgr.save(step, state, data_iterator=it)
                if interrupt == "kill" and step == at:
                    mgr.wait_until_finished()
                if interrupt == "kill" and step == at + 3:
                    _write(report, out)
                    os.kill(os.getpid(), signal.SIGKILL)
                if mgr.reached_preemption(step):
                    break
        out["final"] = fingerprint(state)
    finally:
        _write(report, out)
    return out


def _write(path, out):
    with open(path + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- multi-process scenarios
def process_data(pid):
    """Each process reads its own records (a different shard, shuffled with its own seed)."""
    return records()[pid::2] + 100.0 * pid


def mh_save(pid, workdir):
    """Train 12 steps, saving every 5 with each process's own iterator."""
    import jaxckpt

    it = pipeline("dataset", 0, seed=11 + pid, data=process_data(pid))
    batches, states = {}, {}
    with jaxckpt.CheckpointManager(os.path.join(workdir, "run"), save_interval_steps=5, save_timeout=60) as mgr:
        for step in range(1, 13):
            batch = next(it)
            batches[step] = digest(batch)
            if mgr.save(step, {"step": step, "x": np.full(4, pid, np.float32)}, data_iterator=it):
                states[step] = it.get_state()
        mgr.wait_until_finished()
        steps = mgr.all_steps()
    return {"batches": batches, "states": states, "steps": steps}


def mh_restore(pid, workdir):
    """A new job restores step 10: each process gets its own iterator state back."""
    import jaxckpt

    it = pipeline("dataset", 0, seed=11 + pid, data=process_data(pid))
    with jaxckpt.CheckpointManager(os.path.join(workdir, "run"), save_timeout=60) as mgr:
        tree = mgr.restore(data_iterator=it)
        raw = mgr.data_iterator_state()
        after = {step: digest(next(it)) for step in (11, 12)}
    return {"restored_step": int(tree["step"]), "raw": raw, "after": after}


def mh_auto(pid, workdir):
    """Auto interval with a different clock on each process: process 0's choice rules."""
    import jaxckpt

    clock = {"t": 1_000_000.0}
    step_time, blocking = (0.1, 0.047) if pid == 0 else (0.37, 0.4)
    real = jaxckpt.AsyncCheckpointer.save

    def save(self, *args, **kwargs):  # a snapshot that blocks for `blocking` seconds of this clock
        clock["t"] += blocking
        return real(self, *args, **kwargs)

    jaxckpt.AsyncCheckpointer.save = save
    saved = []
    with jaxckpt.CheckpointManager(os.path.join(workdir, "auto"), save_interval_steps="auto", save_timeout=60,
                                   _clock=lambda: clock["t"]) as mgr:
        for step in range(1, 90):
            clock["t"] += step_time
            if mgr.save(step, {"x": np.full(4, step, np.float32)}):
                saved.append(step)
                mgr.wait_until_finished()
        choice = mgr.save_interval()
    return {"saved": saved, "steps": choice.steps, "bound": choice.bound, "reason": choice.reason}


SCENARIOS = {"save": mh_save, "restore": mh_restore, "auto": mh_auto}


def multihost(scenario, pid, nproc, port, workdir):
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", nproc, pid, heartbeat_timeout_seconds=30,
                               initialization_timeout=60)
    out = SCENARIOS[scenario](pid, workdir)
    # Process 0 hosts the coordination service: leaving before the others
    # have read its last values fails them ("Connection reset by peer").
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("scenario done")
    print("RESULT " + json.dumps(out), flush=True)
    os._exit(0)  # skip jax.distributed shutdown barriers


def main(argv):
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain reads absl flags; a program not run by absl.app has parsed none
    if argv[0] == "mh":
        multihost(argv[1], int(argv[2]), int(argv[3]), argv[4], argv[5])
        return
    kind, workers, directory, steps, save_every, interrupt, at, report = argv[1:]
    out = train(kind, int(workers), directory, int(steps), int(save_every), interrupt, int(at), report)
    _write(report, out)


if __name__ == "__main__":
    main(sys.argv[1:])
