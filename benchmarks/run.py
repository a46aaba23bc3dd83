"""Run the checkpoint benchmarks: `python -m benchmarks.run --workloads W1,W2,W3 --rounds 3`.

Every measurement runs in its own fresh process (`benchmarks.worker`).
Rounds are interleaved: each round measures the physical limits and then
every method once, starting from a different method each round, so slow
phases of a shared machine hit all methods alike.  Raw results go to
`benchmarks/results/<timestamp>-<workloads>.json` after every measurement; the
report (`benchmarks/report.py`) is written at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import sys
from pathlib import Path

from . import machine, measure, methods, report, workloads
from .subproc import Runner

HERE = Path(__file__).resolve().parent
SHORT_METHODS = ("jaxckpt-async", "jaxckpt-sync", "orbax-async")


def _rotated(items: list[str], k: int) -> list[str]:
    k %= max(1, len(items))
    return items[k:] + items[:k]


def _phases(method: str, cold: bool) -> list[str]:
    phases = ["save", "restore_warm"]
    if cold:
        phases.append("restore_cold")
    if methods.get(method).asynchronous:
        phases.append("concurrent")
    return phases


def _progress(record: dict) -> str:
    where = f"[round {record['round'] + 1} {record['workload']}]"
    what = record.get("method") or "limits"
    if not record["ok"]:
        return f"{where} {what} {record['phase']}: FAILED: {record['error'].splitlines()[-1]}"
    keys = ("blocking_s", "total_s", "restore_s", "slowdown_pct", "rss_save_bytes",
            "rss_restore_bytes", "files")
    shown = {k: record[k] for k in keys if isinstance(record.get(k), (int, float))}
    if record["phase"] == "limits":
        shown = {k: round(v["gbps"], 2) for k, v in record.items()
                 if isinstance(v, dict) and "gbps" in v}
    text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in shown.items())
    return f"{where} {what} {record['phase']}: {text} ({record.get('wall_s', 0):.1f} s)"


def run_round(runner: Runner, workload: str, quick: bool, round_no: int,
              method_names: list[str], cold: bool):
    """Yield the records of one round of one workload."""
    base = {"round": round_no, "workload": workload}
    digests = str(_digests_path(runner, workload))
    spec = {"workload": workload, "quick": quick, "digests": digests}
    limits_root = runner.scratch / f"{workload}-limits"
    yield base | {"method": None, "phase": "limits"} | runner.call(
        spec | {"phase": "limits", "root": str(limits_root)})
    shutil.rmtree(limits_root, ignore_errors=True)
    for name in _rotated(method_names, round_no):
        for phase in _phases(name, cold):
            suffix = "-loop" if phase == "concurrent" else ""
            root = runner.scratch / f"{workload}-{name}-r{round_no}{suffix}"
            record = base | {"method": name, "phase": phase} | runner.call(
                spec | {"phase": phase, "method": name, "root": str(root)})
            yield record
            if phase in ("save", "concurrent") and not record["ok"]:
                break  # nothing to restore
        for leftover in runner.scratch.glob(f"{workload}-{name}-r{round_no}*"):
            shutil.rmtree(leftover, ignore_errors=True)


def _digests_path(runner: Runner, workload: str) -> Path:
    return runner.scratch / f"{workload}-digests.json"


def make_references(runner: Runner, workload_names: list[str], quick: bool) -> None:
    """Leaf digests of each workload, computed once, for the restore checks."""
    for workload in workload_names:
        result = runner.call({"phase": "reference", "workload": workload, "quick": quick,
                              "digests": str(_digests_path(runner, workload))})
        if not result["ok"]:
            raise SystemExit(f"cannot compute reference digests of {workload}: "
                             f"{result['error']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="W1,W2",
                   help="comma-separated subset of W1,W2,W3 (default W1,W2)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds; medians are over rounds "
                        "(default 3; 1 with --quick or --short)")
    p.add_argument("--quick", action="store_true",
                   help="small versions of the workloads: a smoke run (< 2 min)")
    p.add_argument("--short", action="store_true",
                   help="full-size workloads, 1 round, only "
                        f"{', '.join(SHORT_METHODS)} (a few minutes on a GPU host)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated subset of {','.join(methods.ALL)} (default all)")
    p.add_argument("--scratch", default=str(HERE / ".scratch"),
                   help="temporary directory; must be on the file system under test")
    p.add_argument("--results", default=str(HERE / "results"), help="where the JSON goes")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per process")
    p.add_argument("--no-results-md", action="store_true",
                   help="do not overwrite benchmarks/RESULTS.md (quick and short runs never do)")
    p.add_argument("--verbose", action="store_true", help="show the workers' stderr")
    args = p.parse_args(argv)
    args.workload_list = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for name in args.workload_list:
        workloads.get(name)  # validates the name
    if args.rounds is None:
        args.rounds = 1 if (args.quick or args.short) else 3
    if args.methods:
        args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    else:
        args.method_list = list(SHORT_METHODS if args.short else methods.ALL)
    for name in args.method_list:
        methods.get(name)
    return args


def _result_stem(args: argparse.Namespace, started: datetime.datetime) -> str:
    tag = "-quick" if args.quick else "-short" if args.short else ""
    return f"{started:%Y%m%dT%H%M%S}-{'-'.join(args.workload_list)}{tag}"


def _available(runner: Runner, wanted: list[str]) -> tuple[dict, list[str]]:
    """The child's JAX backend description, and the wanted methods that import."""
    info = runner.call({"phase": "describe"})
    if not info["ok"]:
        raise SystemExit(f"cannot start a worker: {info['error']}")
    unavailable = info["unavailable"]
    for name in wanted:
        if name in unavailable:
            print(f"{name}: not available ({unavailable[name]}); skipped", file=sys.stderr)
    return info, [m for m in wanted if m not in unavailable]


def _run_header(args, argv, started, runner: Runner) -> dict:
    jax_info, method_names = _available(runner, args.method_list)
    return {
        "command": "python -m benchmarks.run " + shlex.join(argv),
        "started": started.isoformat(timespec="seconds"),
        "quick": args.quick, "short": args.short, "rounds": args.rounds,
        "methods": method_names, "reference": methods.REFERENCE,
        "cold_reads": measure.can_drop_caches(),
        "machine": machine.describe(runner.scratch) | {"jax": jax_info},
        "workloads": {w: workloads.get(w, args.quick).describe() for w in args.workload_list},
        "records": [],
    }


def _measure(runner: Runner, args, data: dict, json_path: Path) -> None:
    """All rounds; the JSON is rewritten after each round and on any abort."""
    try:
        make_references(runner, args.workload_list, args.quick)
        for round_no in range(args.rounds):
            for workload in args.workload_list:
                for record in run_round(runner, workload, args.quick, round_no,
                                        data["methods"], data["cold_reads"]):
                    print(_progress(record), flush=True)
                    data["records"].append(record)
                    json_path.write_text(json.dumps(data, indent=1))  # a killed run keeps its records
        data["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    finally:
        json_path.write_text(json.dumps(data, indent=1))


def _write_reports(args, data: dict, json_path: Path) -> list[Path]:
    paths = [json_path.with_suffix(".md")]
    if not (args.quick or args.short or args.no_results_md):
        paths.append(HERE / "RESULTS.md")
    text = report.render(data, source=json_path)
    for path in paths:
        path.write_text(text)
    return paths


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = datetime.datetime.now()
    stem = _result_stem(args, started)
    json_path = Path(args.results) / f"{stem}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    runner = Runner("benchmarks.worker", Path(args.scratch) / stem, args.timeout, args.verbose)
    runner.scratch.mkdir(parents=True, exist_ok=True)
    try:
        data = _run_header(args, argv, started, runner)
        _measure(runner, args, data, json_path)
    finally:
        shutil.rmtree(runner.scratch, ignore_errors=True)
    md_paths = _write_reports(args, data, json_path)
    print(report.targets_text(data))
    print(f"raw results: {json_path}\nreport: {', '.join(str(p) for p in md_paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
