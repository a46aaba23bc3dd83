"""Training-loop overhead of checkpointing: `python -m benchmarks.train_overhead`.

A Flax linen MLP trained with optax Adam (params + Adam moments: a few
hundred MB) runs the same number of steps four ways, each in a fresh
process, interleaved over rounds:

  none     no checkpointing
  jaxckpt       jaxckpt.CheckpointManager(save_interval_steps=K, async_save=True)
                (default copy_cpu_arrays=None: views until the loop is seen to
                donate, then pooled copies)
  jaxckpt-view  the same with copy_cpu_arrays=False (CPU backend: zero-copy
                views always, which keep a donating step from reusing buffers)
  jaxckpt-auto  jaxckpt.CheckpointManager(save_interval_steps="auto",
                max_overhead=0.02): the manager measures the step time and
                each save's cost and picks the interval (target: <= 2.5%
                measured overhead; the report gives the interval it chose)
  orbax    orbax CheckpointManager(save_interval_steps=K, async checkpointing)

and reports steps/s and the slowdown against `none` of the same round.  The
train step donates its state, as real training does.  Before the timed loop
each manager saves twice in a scratch directory; the second save's total
time ("one save") tells whether a save fits in the compute time of one
interval (the auto mode skips this probe: it saves when it decides).  One
checkpoint per run is restored afterwards and compared with a host copy taken
when it was saved (the copy's time is left out of the timing in every mode).
The auto mode's first saves are how it measures (one ~10 steps in, one ~10
steps after that write ends), so runs of a few hundred steps (``--steps 400``)
show its steady state better than the default 100.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from . import machine, measure, subproc

HERE = Path(__file__).resolve().parent
MODES = ("none", "jaxckpt", "jaxckpt-view", "jaxckpt-auto", "orbax")
AUTO_MAX_OVERHEAD = 0.02
AUTO_TARGET_PCT = 2.5


@dataclasses.dataclass(frozen=True)
class Config:
    width: int = 2048
    depth: int = 8
    d_in: int = 512
    batch: int = 64
    steps: int = 100
    interval: int = 20

    @classmethod
    def quick(cls) -> Config:
        return cls(width=512, depth=3, d_in=128, batch=32, steps=30, interval=10)


# --------------------------------------------------------------------------
# The model and its train step (child process)


def _model_and_state(cfg: Config):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(cfg.depth):
                x = nn.gelu(nn.Dense(cfg.width)(x))
            return nn.Dense(cfg.d_in)(x)

    model = MLP()
    params = model.init(jax.random.key(0), jnp.zeros((1, cfg.d_in), jnp.float32))
    tx = optax.adam(1e-4)
    return model, tx, {"params": params, "opt": tx.init(params)}


def _train_step(cfg: Config, model, tx):
    import jax
    import jax.numpy as jnp
    import optax

    def loss_fn(params, x):
        return jnp.mean((model.apply(params, x) - jnp.sin(x)) ** 2)

    def step(state, i):
        x = jax.random.normal(jax.random.fold_in(jax.random.key(1), i), (cfg.batch, cfg.d_in))
        grads = jax.grad(loss_fn)(state["params"], x)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt}

    return jax.jit(step, donate_argnums=0)


def _payload(state) -> dict:
    """What gets checkpointed: a plain dict of arrays (params + Adam moments)."""
    adam = state["opt"][0]
    return {"params": state["params"], "adam": {"count": adam.count, "mu": adam.mu,
                                                "nu": adam.nu}}


# --------------------------------------------------------------------------
# Managers behind one interface: save(step, tree), wait(), restore(step, like), close()


class _JaxckptManager:
    copy_cpu_arrays = None  # the default
    auto = False

    def __init__(self, root: Path, interval: int):
        import jaxckpt

        self.root = root
        policy = ({"save_interval_steps": "auto", "max_overhead": AUTO_MAX_OVERHEAD} if self.auto
                  else {"save_interval_steps": interval})
        self._mgr = jaxckpt.CheckpointManager(root, **policy, max_to_keep=None, async_save=True,
                                              copy_cpu_arrays=self.copy_cpu_arrays)

    def save(self, step, tree):
        return self._mgr.save(step, tree)

    def wait(self):
        self._mgr.wait_until_finished()

    def restore(self, step, like):
        import jaxckpt

        if hasattr(self._mgr, "restore"):
            return self._mgr.restore(step)
        matches = [p for p in self.root.iterdir() if p.is_dir() and p.name.endswith(str(step))]
        if len(matches) != 1:
            raise FileNotFoundError(f"no unique checkpoint directory for step {step} in "
                                    f"{self.root}: {[p.name for p in self.root.iterdir()]}")
        return jaxckpt.restore(matches[0])

    def close(self):
        self._mgr.close()


class _OrbaxManager:
    def __init__(self, root: Path, interval: int):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        options = ocp.CheckpointManagerOptions(save_interval_steps=interval, max_to_keep=None,
                                               enable_async_checkpointing=True)
        self._mgr = ocp.CheckpointManager(root, options=options)

    def save(self, step, tree):
        return self._mgr.save(step, args=self._ocp.args.StandardSave(tree))

    def wait(self):
        self._mgr.wait_until_finished()

    def restore(self, step, like):
        import jax

        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), like)
        return self._mgr.restore(step, args=self._ocp.args.StandardRestore(abstract))

    def close(self):
        self._mgr.close()


class _JaxckptViewManager(_JaxckptManager):
    """The same with ``copy_cpu_arrays=False``: the snapshot always holds
    zero-copy views of CPU arrays, so the donating train step cannot reuse
    those buffers while a save runs."""
    copy_cpu_arrays = False


class _JaxckptAutoManager(_JaxckptManager):
    """``save_interval_steps="auto"``, ``max_overhead=0.02``: the interval is the manager's choice."""
    auto = True

    def interval(self) -> dict:
        choice = self._mgr.save_interval()
        return {"steps": choice.steps, "bound": choice.bound, "step_time_s": choice.step_time_s,
                "save_cost_s": choice.save_cost_s, "reason": choice.reason}


MANAGERS = {"jaxckpt": _JaxckptManager, "jaxckpt-view": _JaxckptViewManager,
            "jaxckpt-auto": _JaxckptAutoManager, "orbax": _OrbaxManager}


def check_available(mode: str) -> str | None:
    """None, or why `mode` cannot run (jaxckpt's manager may not exist yet)."""
    try:
        if mode.startswith("jaxckpt"):
            import jaxckpt

            jaxckpt.CheckpointManager  # noqa: B018
        elif mode == "orbax":
            import orbax.checkpoint  # noqa: F401
    except (ImportError, AttributeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _one_save_s(manager_cls, root: Path, interval: int, tree) -> float:
    """Total time of a second save in a scratch manager (the first warms up)."""
    mgr = manager_cls(root, interval)
    try:
        mgr.save(0, tree)
        mgr.wait()
        t0 = time.perf_counter()
        mgr.save(interval, tree)
        mgr.wait()
        return time.perf_counter() - t0
    finally:
        mgr.close()
        shutil.rmtree(root, ignore_errors=True)


def _host_copy(tree):
    import jax
    import numpy as np

    return jax.tree.map(lambda a: np.array(a, copy=True), tree)


def _compare(restored, expected) -> None:
    import jax
    import numpy as np

    got = jax.tree_util.tree_flatten_with_path(restored)[0]
    want = jax.tree_util.tree_flatten_with_path(expected)[0]
    if [jax.tree_util.keystr(p) for p, _ in got] != [jax.tree_util.keystr(p) for p, _ in want]:
        raise measure.RestoreMismatch("restored tree structure differs from the saved one")
    for (path, a), (_, b) in zip(got, want):
        a = np.asarray(a)
        if a.dtype != b.dtype or a.shape != b.shape or not np.array_equal(
                measure.as_bytes(a), measure.as_bytes(b)):
            raise measure.RestoreMismatch(f"at {jax.tree_util.keystr(path)}: restored value "
                                          "differs from the saved one")


def describe_child() -> dict:
    """Backend and mode availability, asked of a child so that the parent
    never initialises an accelerator (it would hold memory the children need)."""
    import jax

    return {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "unavailable": {m: why for m in MODES if (why := check_available(m))}}


def run_child(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp

    if spec["mode"] == "describe":
        return describe_child()
    cfg = Config(**spec["config"])
    root = Path(spec["root"])
    model, tx, state = _model_and_state(cfg)
    step_fn = _train_step(cfg, model, tx)
    for i in range(3):  # compile and settle
        state = step_fn(state, jnp.int32(-1 - i))
    jax.block_until_ready(state)
    state_bytes = sum(a.nbytes for a in jax.tree.leaves(_payload(state)))
    manager_cls = MANAGERS.get(spec["mode"])
    result = {"mode": spec["mode"], "state_bytes": state_bytes, "steps": cfg.steps}
    auto = getattr(manager_cls, "auto", False)
    if manager_cls and not auto:
        result["one_save_s"] = _one_save_s(manager_cls, root / "probe", cfg.interval,
                                           _payload(state))
    mgr = manager_cls(root / "run", cfg.interval) if manager_cls else None
    check_step = 2 * cfg.interval if cfg.steps >= 3 * cfg.interval else cfg.interval
    saves = 0
    excluded = 0.0
    t0 = time.perf_counter()
    for i in range(1, cfg.steps + 1):
        state = step_fn(state, jnp.int32(i))
        saved = bool(mgr.save(i, _payload(state))) if mgr is not None else False
        saves += saved
        if auto and saved and saves == 1:
            check_step = i  # the auto mode verifies its first save
        if i == check_step:
            # Wait for the queued steps inside the timed region (their compute
            # counts), then leave only the copy itself out: with asynchronous
            # dispatch the copy would otherwise wait for up to ~20 queued steps
            # and take their time out of the mode that had not already waited
            # for them in a save (this made "none" look ~20% faster).
            jax.block_until_ready(state)
            t_copy = time.perf_counter()
            expected = _host_copy(_payload(state))
            excluded += time.perf_counter() - t_copy
    jax.block_until_ready(state)
    loop_s = time.perf_counter() - t0 - excluded
    result |= {"loop_s": loop_s, "steps_per_s": cfg.steps / loop_s, "saves": saves}
    if mgr is not None:
        if auto:
            result["interval"] = mgr.interval()
        t_drain = time.perf_counter()
        mgr.wait()
        result["drain_s"] = time.perf_counter() - t_drain
        _compare(mgr.restore(check_step, expected), expected)
        result["verified_step"] = check_step
        mgr.close()
    return result


# --------------------------------------------------------------------------
# Parent: rounds, medians, report


def _slowdowns(records: list[dict], mode: str) -> list[float]:
    """Per-round slowdown of `mode` against `none`: extra time per step, in percent."""
    by_round: dict = {}
    for r in records:
        if r["ok"]:
            by_round.setdefault(r["round"], {})[r["mode"]] = r["steps_per_s"]
    return [100.0 * (rates["none"] / rates[mode] - 1)
            for rates in by_round.values() if mode in rates and "none" in rates]


def summarize(records: list[dict], cfg: Config, available: list[str]) -> dict:
    out: dict = {}
    for mode in available:
        ok = [r for r in records if r["ok"] and r["mode"] == mode]
        if not ok:
            continue
        row = {"steps_per_s": statistics.median(r["steps_per_s"] for r in ok),
               "state_bytes": ok[0]["state_bytes"], "rounds": len(ok)}
        if mode != "none":
            row["slowdown_pct"] = statistics.median(_slowdowns(records, mode) or [float("nan")])
            if all("one_save_s" in r for r in ok):
                row["one_save_s"] = statistics.median(r["one_save_s"] for r in ok)
        if mode == "jaxckpt-auto":
            row["intervals"] = [r["interval"]["steps"] for r in ok]
            row["saves"] = [r["saves"] for r in ok]
            row["save_cost_s"] = statistics.median(r["interval"]["save_cost_s"] or 0.0 for r in ok)
        out[mode] = row
    if "none" in out:
        out["interval_compute_s"] = cfg.interval / out["none"]["steps_per_s"]
    return out


def target_lines(summary: dict) -> list[str]:
    return [line for mode in ("jaxckpt",) for line in _targets(summary, mode)] + _auto_target(summary)


def _auto_target(summary: dict) -> list[str]:
    auto = summary.get("jaxckpt-auto")
    if not auto:
        return ["n/a: the auto mode did not run"]
    ok = auto["slowdown_pct"] <= AUTO_TARGET_PCT
    return [f"{'PASS' if ok else 'FAIL'}: jaxckpt-auto (max_overhead={AUTO_MAX_OVERHEAD}) slowdown "
            f"{auto['slowdown_pct']:.1f}% <= {AUTO_TARGET_PCT}%; intervals chosen {auto['intervals']} steps, "
            f"saves per run {auto['saves']}"]


def _targets(summary: dict, mode: str) -> list[str]:
    jx, ob = summary.get(mode), summary.get("orbax")
    if not jx or not ob:
        return ["n/a: needs both the jaxckpt and the orbax manager"]
    half = jx["slowdown_pct"] <= 0.5 * ob["slowdown_pct"]
    lines = [f"{'PASS' if half else 'FAIL'}: {mode} slowdown {jx['slowdown_pct']:.1f}% <= half "
             f"of orbax's {ob['slowdown_pct']:.1f}%"]
    fits = jx["one_save_s"] < summary["interval_compute_s"]
    if fits:
        ok = jx["slowdown_pct"] < 5.0
        lines.append(f"{'PASS' if ok else 'FAIL'}: {mode} slowdown {jx['slowdown_pct']:.1f}% "
                     f"< 5% (one save {jx['one_save_s']:.3g} s < interval compute "
                     f"{summary['interval_compute_s']:.3g} s)")
    else:
        lines.append(f"n/a: < 5% applies only where one save ({jx['one_save_s']:.2f} s) is "
                     f"under the interval's compute time ({summary['interval_compute_s']:.2f} s)")
    return lines


def render(data: dict) -> str:
    s, cfg = data["summary"], data["config"]
    lines = ["# Training-loop overhead of checkpointing", "",
             f"Command: `{data['command']}`; started {data['started']}; {data['rounds']} "
             "round(s), each mode in a fresh process.", "",
             f"Flax MLP, width {cfg['width']}, depth {cfg['depth']}, batch {cfg['batch']}, Adam; "
             f"{cfg['steps']} steps, a save every {cfg['interval']} steps. Machine: "
             f"{data['machine']['cpu_model']}, {data['machine']['cores']} cores, backend "
             f"{data['backend']}.", "",
             "| mode | state | steps/s | slowdown vs none | one save (total) | rounds |",
             "|---|---|---|---|---|---|"]
    for mode in MODES:
        row = s.get(mode)
        if row is None:
            why = data["unavailable"].get(mode, "failed (see JSON)" if mode in data.get("modes", MODES)
                                          else "not run (--modes)")
            lines.append(f"| {mode} | n/a | n/a | n/a | n/a: {why} | 0 |")
            continue
        slow = f"{row['slowdown_pct']:+.1f}%" if "slowdown_pct" in row else "-"
        save = f"{row['one_save_s']:.3f} s" if "one_save_s" in row else "-"
        if "intervals" in row:
            save = (f"cost {row['save_cost_s']:.3f} s; every {'/'.join(map(str, row['intervals']))} "
                    "steps (chosen)")
        lines.append(f"| {mode} | {row['state_bytes'] / 2**20:.0f} MiB | "
                     f"{row['steps_per_s']:.2f} | {slow} | {save} | {row['rounds']} |")
    if "interval_compute_s" in s:
        lines += ["", f"Compute time of one interval: {s['interval_compute_s']:.2f} s."]
    lines += ["", "## Targets", ""] + [f"- {t}" for t in target_lines(s)]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_overhead",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="timed steps per process")
    p.add_argument("--interval", type=int, default=None, help="save every K steps")
    p.add_argument("--quick", action="store_true", help="a tiny model: smoke test")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated modes to run (default: all)")
    p.add_argument("--scratch", default=str(HERE / ".scratch"))
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--timeout", type=float, default=1200)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return subproc.child_main(argv[1:], run_child)
    args = parse_args(argv)
    cfg = Config.quick() if args.quick else Config()
    cfg = dataclasses.replace(cfg, **{k: v for k, v in (("steps", args.steps),
                                                        ("interval", args.interval)) if v})
    started = datetime.datetime.now()
    stem = f"{started:%Y%m%dT%H%M%S}-train{'-quick' if args.quick else ''}"
    scratch = Path(args.scratch) / stem
    scratch.mkdir(parents=True, exist_ok=True)
    runner = subproc.Runner("benchmarks.train_overhead", scratch, args.timeout, args=("--child",))
    records = []
    try:
        info = runner.call({"mode": "describe"})
        if not info["ok"]:
            raise SystemExit(f"cannot start a child process: {info['error']}")
        unavailable = info["unavailable"]
        for mode, why in unavailable.items():
            print(f"{mode}: not available ({why}); skipped", file=sys.stderr)
        asked = [m for m in args.modes.split(",") if m]
        if [m for m in asked if m not in MODES] or "none" not in asked:
            raise SystemExit(f"--modes: choose among {', '.join(MODES)}, 'none' included (the baseline)")
        modes = [m for m in MODES if m in asked and m not in unavailable]
        for round_no in range(args.rounds):
            for mode in modes[round_no % len(modes):] + modes[:round_no % len(modes)]:
                root = scratch / f"{mode}-r{round_no}"
                record = {"round": round_no, "mode": mode} | runner.call(
                    {"mode": mode, "root": str(root), "config": dataclasses.asdict(cfg)})
                shutil.rmtree(root, ignore_errors=True)
                records.append(record)
                print(_progress(record), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    data = {"command": "python -m benchmarks.train_overhead " + " ".join(argv),
            "started": started.isoformat(timespec="seconds"), "rounds": args.rounds,
            "config": dataclasses.asdict(cfg), "machine": machine.describe(HERE),
            "backend": f"{info['backend']} ({info['device_kind']})", "unavailable": unavailable, "modes": modes,
            "records": records,
            "summary": summarize(records, cfg, modes)}
    out = Path(args.results) / f"{stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    text = render(data)
    out.with_suffix(".md").write_text(text)
    print(text + f"\nraw results: {out}\nreport: {out.with_suffix('.md')}")
    return 0


def _progress(record: dict) -> str:
    head = f"[round {record['round'] + 1}] {record['mode']}"
    if not record["ok"]:
        return f"{head}: FAILED: {record['error'].splitlines()[-1]}"
    extra = f", one save {record['one_save_s']:.3f} s" if "one_save_s" in record else ""
    if "interval" in record:
        extra += f", {record['saves']} saves, chose every {record['interval']['steps']} steps"
    return f"{head}: {record['steps_per_s']:.2f} steps/s{extra} ({record['wall_s']:.1f} s)"


if __name__ == "__main__":
    sys.exit(main())
