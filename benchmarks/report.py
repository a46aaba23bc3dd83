"""Medians, ratios and target checks from a results JSON, as markdown.

    python -m benchmarks.report benchmarks/results/<run>.json [--out benchmarks/RESULTS.md]

Every ratio is computed per round (a method against the reference method or
against the physical limit measured in the same round) and then the median
over rounds is taken, so a slow phase of the machine cancels out.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from collections import defaultdict
from pathlib import Path

MIB = 1 << 20
GIB = 1 << 30


# --------------------------------------------------------------------------
# Figures and their physical limits


@dataclasses.dataclass(frozen=True)
class Figure:
    key: str
    label: str
    phase: str
    field: str
    unit: str  # "s", "bytes", "count" or "pct"
    limit: str | None = None  # limits entry giving the lower bound, or "state"
    limit_label: str = ""


FIGURES = (
    Figure("blocking_s", "blocking", "save", "blocking_s", "s", "memcpy", "÷ memcpy"),
    Figure("total_s", "total save", "save", "total_s", "s", "write", "÷ write limit"),
    Figure("blocking2_s", "blocking, 2nd save", "save", "blocking2_s", "s", "memcpy", "÷ memcpy"),
    Figure("total2_s", "total, 2nd save", "save", "total2_s", "s", "write", "÷ write limit"),
    Figure("restore_warm_s", "restore warm", "restore_warm", "restore_s", "s", "warm_read",
           "÷ warm read"),
    Figure("restore_cold_s", "restore cold", "restore_cold", "restore_s", "s", "cold_read",
           "÷ cold read"),
    Figure("rss_save", "extra RSS save", "save", "rss_save_bytes", "bytes", "state",
           "÷ state bytes"),
    Figure("rss_restore_warm", "extra RSS restore warm", "restore_warm", "rss_restore_bytes",
           "bytes", "state", "÷ state bytes"),
    Figure("rss_restore_cold", "extra RSS restore cold", "restore_cold", "rss_restore_bytes",
           "bytes", "state", "÷ state bytes"),
    Figure("files", "files", "save", "files", "count"),
    Figure("dirs", "dirs", "save", "dirs", "count"),
    Figure("slowdown_pct", "loop slowdown", "concurrent", "slowdown_pct", "pct"),
)
BY_KEY = {f.key: f for f in FIGURES}


def _limit_gbps(limits: dict, name: str) -> float | None:
    if name == "memcpy":
        return max(limits["memcpy_1t"]["gbps"], limits["memcpy_2t"]["gbps"])
    if name == "write":
        return limits["write_limit"]["gbps"]
    entry = limits.get(name, {})
    return entry.get("gbps") if entry.get("available", True) else None


def limit_value(figure: Figure, limits: dict | None, nbytes: int) -> float | None:
    """The physical bound of `figure` for `nbytes`: seconds, or state bytes."""
    if figure.limit is None:
        return None
    if figure.limit == "state":
        return float(nbytes)
    if limits is None:
        return None
    gbps = _limit_gbps(limits, figure.limit)
    return nbytes / (gbps * 1e9) if gbps else None


# --------------------------------------------------------------------------
# Aggregation


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


class Results:
    """Per-round figures of one run, indexed [workload][method][round][figure]."""

    def __init__(self, data: dict):
        self.data = data
        self.reference = data["reference"]
        self.rounds: dict = defaultdict(lambda: defaultdict(dict))
        self.limits: dict = defaultdict(dict)
        self.failures = [r for r in data["records"] if not r["ok"]]
        for record in data["records"]:
            if record["ok"]:
                self._add(record)

    def _add(self, record: dict) -> None:
        wl, rnd = record["workload"], record["round"]
        if record["phase"] == "limits":
            self.limits[wl][rnd] = record
            return
        if record.get("available") is False:
            return
        figs = self.rounds[wl][record["method"]].setdefault(rnd, {})
        for figure in FIGURES:
            if figure.phase == record["phase"] and record.get(figure.field) is not None:
                figs[figure.key] = record[figure.field]

    def nbytes(self, workload: str) -> int:
        return self.data["workloads"][workload]["bytes"]

    def methods(self, workload: str) -> list[str]:
        return [m for m in self.data["methods"] if m in self.rounds[workload]]

    def values(self, workload: str, method: str, key: str) -> list[float]:
        per_round = self.rounds[workload].get(method, {})
        return [figs[key] for _, figs in sorted(per_round.items()) if key in figs]

    def median(self, workload: str, method: str, key: str) -> float | None:
        return _median(self.values(workload, method, key))

    def ratio_to_method(self, workload: str, method: str, other: str, key: str):
        mine = self.rounds[workload].get(method, {})
        theirs = self.rounds[workload].get(other, {})
        return _median(_ratio(mine[r].get(key), theirs[r].get(key))
                       for r in mine if r in theirs)

    def ratio_to_limit(self, workload: str, method: str, key: str):
        figure = BY_KEY[key]
        per_round = self.rounds[workload].get(method, {})
        return _median(
            _ratio(figs.get(key),
                   limit_value(figure, self.limits[workload].get(r), self.nbytes(workload)))
            for r, figs in per_round.items())


# --------------------------------------------------------------------------
# Targets


@dataclasses.dataclass(frozen=True)
class Target:
    text: str
    workloads: tuple[str, ...] | None  # None: every workload measured
    key: str
    against: str  # "orbax-async", "flax-msgpack", "limit" or "rss"
    bound: float  # ratio bound, or the state-bytes factor for "rss"
    strict: bool = False

    def measure(self, res: Results, workload: str) -> tuple[float | None, str]:
        method = "jaxckpt-async"
        value = res.median(workload, method, self.key)
        if self.against == "limit":
            ratio = res.ratio_to_limit(workload, method, self.key)
            return ratio, f"{_fmt(value, 's')} = {_fmt_ratio(ratio)} the limit"
        if self.against == "rss":
            allowed = self.bound * res.nbytes(workload) + 256 * MIB
            return (None if value is None else value / allowed,
                    f"{_fmt(value, 'bytes')} of {_fmt(allowed, 'bytes')} allowed")
        if self.against == "abs":
            return (None if value is None else value / self.bound, f"{_fmt(value, 'pct')}")
        ratio = res.ratio_to_method(workload, method, self.against, self.key)
        other = res.median(workload, self.against, self.key)
        unit = BY_KEY[self.key].unit
        return ratio, (f"{_fmt(value, unit)} vs {_fmt(other, unit)} = {_fmt_ratio(ratio)} "
                       f"{self.against}")

    def limit(self) -> float:
        return 1.0 if self.against in ("rss", "abs") else self.bound


TARGETS = (
    Target("blocking <= 0.5x orbax", ("W1", "W3"), "blocking_s", "orbax-async", 0.5),
    Target("blocking <= 0.1x orbax", ("W2",), "blocking_s", "orbax-async", 0.1),
    Target("total async save <= 1.5x write limit (O_DIRECT)", ("W1", "W3"), "total_s",
           "limit", 1.5),
    Target("save >= 30x faster than orbax", ("W2",), "total_s", "orbax-async", 1 / 30),
    Target("save faster than flax msgpack", ("W2",), "total_s", "flax-msgpack", 1.0, True),
    Target("warm restore >= 30x faster than orbax", ("W2",), "restore_warm_s", "orbax-async",
           1 / 30),
    Target("cold restore >= 30x faster than orbax", ("W2",), "restore_cold_s", "orbax-async",
           1 / 30),
    Target("warm restore faster than flax msgpack", ("W2",), "restore_warm_s", "flax-msgpack",
           1.0, True),
    Target("cold restore faster than flax msgpack", ("W2",), "restore_cold_s", "flax-msgpack",
           1.0, True),
    Target("warm restore >= 5x faster than orbax", None, "restore_warm_s", "orbax-async", 0.2),
    Target("cold restore <= 1.25x cold read", None, "restore_cold_s", "limit", 1.25),
    Target("extra RSS during async save <= 0.5x state + 256 MiB", None, "rss_save", "rss",
           0.5),
    Target("extra RSS during warm restore <= 1.0x state + 256 MiB", None, "rss_restore_warm",
           "rss", 1.0),
    Target("extra RSS during cold restore <= 1.0x state + 256 MiB", None, "rss_restore_cold",
           "rss", 1.0),
    Target("concurrent loop slowdown <= 15%", None, "slowdown_pct", "abs", 15.0),
)


def evaluate_targets(res: Results) -> list[dict]:
    rows = []
    backend = res.data.get("machine", {}).get("jax", {}).get("backend", "cpu")
    for target in TARGETS:
        for workload in res.data["workloads"]:
            if target.workloads is not None and workload not in target.workloads:
                continue
            score, measured = target.measure(res, workload)
            if target.against == "rss" and backend != "cpu":
                # The memory targets are set for the CPU backend, where the
                # snapshot can be a view and a restore can read into the final
                # buffers; on an accelerator the host copy is the snapshot.
                verdict, measured = "n/a", f"{measured} (the target is for the CPU backend)"
            elif score is None:
                verdict = "n/a"
            elif target.strict:
                verdict = "PASS" if score < target.limit() else "FAIL"
            else:
                verdict = "PASS" if score <= target.limit() else "FAIL"
            rows.append({"target": target.text, "workload": workload, "measured": measured,
                         "result": verdict})
    return rows


# --------------------------------------------------------------------------
# Formatting


def _fmt(value, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "s":
        return f"{value:.3g} s" if value < 100 else f"{value:.0f} s"
    if unit == "bytes":
        if abs(value) >= GIB:
            return f"{value / GIB:.2f} GiB"
        if abs(value) >= 10 * MIB or value == 0:
            return f"{value / MIB:.0f} MiB"
        return f"{value / MIB:.2g} MiB" if abs(value) >= MIB else f"{value / 1024:.0f} KiB"
    if unit == "pct":
        return f"{value:+.1f}%"
    return f"{value:g}"


def _fmt_ratio(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3g}x" if value < 100 else f"{value:.0f}x"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _label(method: str) -> str:
    from . import methods

    return methods.ALL[method].label if method in methods.ALL else method


# Table columns: figures shown together in one cell, separated by " / ".
COLUMNS = (
    ("blocking", ("blocking_s",)),
    ("total save", ("total_s",)),
    ("2nd save in the process: blocking / total", ("blocking2_s", "total2_s")),
    ("restore warm", ("restore_warm_s",)),
    ("restore cold", ("restore_cold_s",)),
    ("extra RSS save", ("rss_save",)),
    ("extra RSS restore warm / cold", ("rss_restore_warm", "rss_restore_cold")),
    ("files / dirs", ("files", "dirs")),
    ("loop slowdown", ("slowdown_pct",)),
)


def _rows(res: Results, workload: str, columns, cell) -> list[list[str]]:
    return [[_label(method)] + [" / ".join(cell(method, BY_KEY[k]) for k in keys)
                                for _, keys in columns]
            for method in res.methods(workload)]


def _medians_table(res: Results, workload: str) -> list[str]:
    def cell(method, f):
        return _fmt(res.median(workload, method, f.key), f.unit)

    rows = _rows(res, workload, COLUMNS, cell)
    for row, method in zip(rows, res.methods(workload)):
        row.append(str(len(res.rounds[workload][method])))
    return _table(["method"] + [c[0] for c in COLUMNS] + ["rounds"], rows)


def _ratio_table(res: Results, workload: str, to_limit: bool) -> list[str]:
    if to_limit:
        columns = [(f"{label} ({BY_KEY[keys[0]].limit_label})", keys)
                   for label, keys in COLUMNS if BY_KEY[keys[0]].limit]

        def cell(method, f):
            return _fmt_ratio(res.ratio_to_limit(workload, method, f.key))
    else:
        columns = [c for c in COLUMNS if BY_KEY[c[1][0]].unit != "pct"]

        def cell(method, f):
            return _fmt_ratio(res.ratio_to_method(workload, method, res.reference, f.key))

    return _table(["method"] + [c[0] for c in columns], _rows(res, workload, columns, cell))


LIMIT_ROWS = (
    ("first touch of new memory (page faults)", lambda r: r.get("first_touch")),
    ("memcpy, 1 thread", lambda r: r["memcpy_1t"]),
    ("memcpy, 2 threads", lambda r: r["memcpy_2t"]),
    ("write + fsync, buffered, 64 MiB chunks", lambda r: r["buffered_write"]),
    ("write + fsync, O_DIRECT, 64 MiB chunks", lambda r: r["direct_write"]),
    ("read, cold (after drop_caches)", lambda r: r["cold_read"]),
    ("read, warm (page cache)", lambda r: r["warm_read"]),
)


def _limits_table(res: Results, workload: str) -> list[str]:
    rows = []
    records = list(res.limits[workload].values())
    for label, pick in LIMIT_ROWS:
        entries = [e for e in map(pick, records) if e is not None]
        if not entries:
            continue
        values = [e["gbps"] for e in entries if e.get("available", True)]
        notes = sorted({e["note"] for e in entries if e.get("note")})
        if values:
            cell = [f"{statistics.median(values):.2f}", f"{min(values):.2f}-{max(values):.2f}"]
        else:
            cell = ["n/a", "; ".join(notes) or "n/a"]
        rows.append([label] + cell)
    sources = sorted({r["write_limit"]["source"] for r in records})
    lines = _table(["what", "GB/s (median)", "range"], rows)
    return lines + [f"Write limit used for ratios: {'; '.join(sources)}.", ""]


def _machine_lines(data: dict) -> list[str]:
    m = data["machine"]
    fs = m["filesystem"]
    disk = ", ".join(f"{k} {fs[k]}" for k in ("model", "rotational", "scheduler") if k in fs)
    jax_info = m["jax"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    return [
        f"- CPU: {m['cpu_model']}, {m['cores']} cores ({m['cores_usable']} usable)",
        f"- memory: {m['memory_bytes'] / GIB:.1f} GiB",
        f"- file system: {fs['fs_type']} on {fs['device']} at {fs['mount_point']} "
        f"({fs['options']}){'; ' + disk if disk else ''}",
        f"- kernel: {m['kernel']} ({m['os']}); Python {m['python']}; root: {m['root']}",
        f"- backend: {jax_info['backend']}, {jax_info['device_count']} x "
        f"{jax_info['device_kind']}",
        f"- versions: {versions}",
        "",
    ]


def _targets_lines(res: Results) -> list[str]:
    rows = [[r["result"], r["workload"], r["target"], r["measured"]]
            for r in evaluate_targets(res)]
    lines = ["Checked on `jaxckpt AsyncCheckpointer` (its checkpoints are the ones restored), "
             "from medians of per-round ratios.", ""]
    if res.data.get("quick"):
        lines += ["**Quick run: the workloads are tiny, so these verdicts mean nothing.**", ""]
    return lines + _table(["result", "workload", "target", "measured"], rows)


def targets_text(data: dict) -> str:
    rows = evaluate_targets(Results(data))
    width = max((len(r["target"]) for r in rows), default=0)
    return "\n".join(f"{r['result']:4}  {r['workload']}  {r['target']:{width}}  {r['measured']}"
                     for r in rows)


def _workload_section(res: Results, workload: str) -> list[str]:
    info = res.data["workloads"][workload]
    lines = [f"## {workload}{' (quick)' if info['quick'] else ''}: {info['leaves']} leaves, "
             f"{info['bytes'] / 1e9:.3g} GB (largest leaf "
             f"{_fmt(info['largest_leaf_bytes'], 'bytes')})", "", "### Physical limits", ""]
    lines += _limits_table(res, workload)
    lines += ["### Medians over rounds", ""]
    lines += _medians_table(res, workload)
    lines += [f"### Ratios to {_label(res.reference)} (median of per-round ratios; "
              "< 1 is better)", ""]
    lines += _ratio_table(res, workload, to_limit=False)
    lines += ["### Ratios to the physical limit of the same round "
              "(time ÷ (bytes ÷ bandwidth); RSS ÷ state bytes)", ""]
    lines += _ratio_table(res, workload, to_limit=True)
    return lines


def _failure_lines(res: Results) -> list[str]:
    if not res.failures:
        return []
    lines = ["## Failed measurements", ""]
    for r in res.failures:
        first = r["error"].strip().splitlines()[-1] if r["error"].strip() else "?"
        lines.append(f"- round {r['round'] + 1}, {r['workload']}, {r.get('method') or 'limits'}"
                     f" {r['phase']}: {first}")
    return lines + [""]


def render(data: dict, source: Path | None = None) -> str:
    res = Results(data)
    lines = ["# jaxckpt benchmark results", ""]
    if source is not None:
        lines.append(f"Generated from `{_relative(source)}` by `benchmarks/report.py`.")
    lines += [f"Command: `{data['command']}`; started {data['started']}, finished "
              f"{data.get('finished', '(unfinished)')}; {data['rounds']} round(s), each "
              "measurement in a fresh process. Cold reads: "
              f"{'sync + drop_caches before each' if data['cold_reads'] else 'n/a (not root)'}.",
              "", "See `benchmarks/README.md` for what each figure means.", "",
              "## Machine", ""]
    lines += _machine_lines(data)
    unavailable = data["machine"]["jax"].get("unavailable", {})
    for name, why in unavailable.items():
        lines += [f"- **{name} not available**: {why}", ""]
    lines += ["## Targets", ""] + _targets_lines(res)
    for workload in data["workloads"]:
        lines += _workload_section(res, workload)
    lines += _failure_lines(res)
    return "\n".join(lines).rstrip() + "\n"


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path(__file__).resolve().parent.parent))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    import json

    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    p.add_argument("results", type=Path, help="a benchmarks/results/*.json file")
    p.add_argument("--out", type=Path, default=None, help="markdown file (default: stdout)")
    args = p.parse_args(argv)
    text = render(json.loads(args.results.read_text()), source=args.results)
    if args.out:
        args.out.write_text(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
