"""The report of ``python -m benchmarks.objstore``: the issue's targets
evaluated from a results file, and the Markdown tables (also ``--render JSON``)."""

from __future__ import annotations

import statistics
from pathlib import Path

from . import curlref

TUNE_PASSES = 2  # each value tried twice (order alternated), its best time kept
TARGET_RSS_FRACTION, TARGET_RSS_FIXED = 0.25, 256 << 20


def _med(values):
    values = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(values) if values else None


def _records(data: dict, workload: str, method: str, phase: str) -> dict[int, dict]:
    return {r["round"]: r for r in data["records"]
            if r["workload"] == workload and r["method"] == method and r["phase"] == phase and r["ok"]}


def _figure(data, workload, method, what) -> dict[int, float]:
    """Per round: 'save' (total), 'blocking', 'restore', 'rss_save', 'rss_restore'; for the client
    alone also 'restore_fresh' (its GETs into fresh memory) and 'restore_cold' (its GET in a fresh
    process of its own, the ``get`` phase)."""
    if method.startswith(("client-", "curl-")):
        recs = _records(data, workload, method, "get" if what == "restore_cold" else method.split("-")[0])
        key = {"save": "total_s", "restore": "restore_s", "restore_fresh": "fresh_get_s",
               "restore_cold": "restore_s"}.get(what)
    else:
        phase = "restore" if what in ("restore", "rss_restore") else "save"
        recs = _records(data, workload, method, phase)
        key = {"save": "total_s", "blocking": "blocking_s", "restore": "restore_s", "rss_save": "rss_save_bytes",
               "rss_restore": "rss_restore_bytes"}[what]
    return {r: rec[key] for r, rec in recs.items() if key and isinstance(rec.get(key), (int, float))}


def _ratio(data, workload, a, what_a, b, what_b=None) -> float | None:
    """Median over rounds of figure(a) / figure(b) in the same round."""
    fa, fb = _figure(data, workload, a, what_a), _figure(data, workload, b, what_b or what_a)
    return _med([fa[r] / fb[r] for r in fa if r in fb and fb[r] > 0])


def _s(v) -> str:
    return "n/a" if v is None else (f"{v * 1e3:.0f} ms" if v < 1 else f"{v:.2f} s")


def _b(v) -> str:
    return "n/a" if v is None else f"{v / 2**20:+.0f} MiB"


def _x(v) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def evaluate(data: dict) -> list[dict]:
    """The issue's targets, per store and workload, from medians of per-round ratios."""
    out = []
    for wname, wdesc in data.get("workloads", {}).items():
        for store in data["stores"]:
            j, c, o = f"jaxckpt-{store}", f"client-{store}", f"orbax-{store}"
            if not _figure(data, wname, j, "save"):
                continue
            cold = bool(_figure(data, wname, c, "restore_cold"))  # runs before 2026-12-07 have no get phase
            get = ("restore <= 1.25x the client alone's get" + (" (in a fresh process, as the restore)" if cold else ""),
                   _ratio(data, wname, j, "restore", c, "restore_cold" if cold else "restore"), 1.25, "le")
            checks = [("total save <= 1.25x the client alone's put", _ratio(data, wname, j, "save", c), 1.25, "le"),
                      get,
                      ("save >= 2x faster than orbax (orbax / jaxckpt)", _ratio(data, wname, o, "save", j), 2.0, "ge"),
                      ("restore >= 2x faster than orbax (orbax / jaxckpt)", _ratio(data, wname, o, "restore", j),
                       2.0, "ge")]
            if wname == "W2":
                checks.append(("W2 save >= 10x faster than orbax", _ratio(data, wname, o, "save", j), 10.0, "ge"))
            rss = _med(_figure(data, wname, j, "rss_save").values())
            limit = TARGET_RSS_FRACTION * wdesc["bytes"] + TARGET_RSS_FIXED
            checks.append((f"extra RSS during the async save <= 0.25 x state + 256 MiB ({limit / 2**20:.0f} MiB)",
                           None if rss is None else rss / limit, 1.0, "le"))
            for name, value, bound, how in checks:
                ok = None if value is None else (value <= bound if how == "le" else value >= bound)
                out.append({"workload": wname, "store": store, "target": name, "value": value, "bound": bound,
                            "pass": ok, "rss_bytes": rss if "RSS" in name else None})
    return out


def render(data: dict) -> str:
    m = data["machine"]
    lines = [f"# Object storage benchmark, {data['stamp']}", "",
             f"`{data['command'].replace(' --in-netns', '')}`", "",
             f"{m['cpu_model']}, {m['cores_usable']} cores, {m['memory_bytes'] / 2**30:.0f} GiB; "
             f"Python {m['python']}; JAX backend {data['describe'].get('backend')}; "
             f"network namespace: {'yes (loopback only)' if data.get('netns') else 'no'}.",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in data["describe"]["versions"].items() if v) + ".",
             "Servers on 127.0.0.1: " + "; ".join(f"{k}: {' '.join(Path(v['command'][0]).name.split())} "
                                                  f"(up in {v['startup_s']:.1f} s)"
                                                  for k, v in data["servers"].items()) + ".", "",
             f"{data['rounds']} rounds, each method in fresh processes, interleaved; medians over rounds; ratios are "
             "medians of per-round ratios.", ""]
    if data.get("latency_ms"):
        lines += [f"Every request held {data['latency_ms']:g} ms by a proxy in front of each server "
                  "(`--latency-ms`: a store as far away as a cloud region; the proxy also caps the bandwidth).", ""]
    if data["describe"].get("jaxckpt_gcs"):
        lines += [f"jaxckpt on gs:// not measured: `jaxckpt.gcsclient` did not import "
                  f"({data['describe']['jaxckpt_gcs']}).", ""]
    for wname, wd in data.get("workloads", {}).items():
        lines += [f"## {wname}: {wd['leaves']} leaves, {wd['bytes'] / 1e9:.3f} GB"
                  + (f" (W1 at scale {wd['scale']})" if wd.get("scale", 1.0) != 1.0 else ""), "",
                  "| method | save blocking | save total | restore | extra RSS save | extra RSS restore | "
                  "save MiB/s | restore MiB/s |", "|---|---|---|---|---|---|---|---|"]
        for method in data["methods"]:
            f = {w: _med(_figure(data, wname, method, w).values())
                 for w in ("blocking", "save", "restore", "rss_save", "rss_restore")} if not method.startswith(
                ("client-", "curl-")) else {"save": _med(_figure(data, wname, method, "save").values()),
                                 "restore": _med(_figure(data, wname, method, "restore").values())}
            if not any(v is not None for v in f.values()):
                errors = [r for r in data["records"] if r["workload"] == wname and r["method"] == method
                          and not r["ok"]]
                why = errors[0]["error"].strip().splitlines()[-1][:160] if errors else "not run"
                lines.append(f"| {method} | failed: {why} | | | | | | |")
                continue
            rate = lambda s: "n/a" if not s else f"{wd['bytes'] / s / 2**20:.0f}"  # noqa: E731
            label = method + (" (put / get)" if method.startswith(("client-", "curl-")) else "")
            lines.append(f"| {label} | {_s(f.get('blocking'))} | {_s(f['save'])} | {_s(f['restore'])} | "
                         f"{_b(f.get('rss_save'))} | {_b(f.get('rss_restore'))} | {rate(f['save'])} | "
                         f"{rate(f['restore'])} |")
            cold = _med(_figure(data, wname, method, "restore_cold").values()) if method.startswith("client-") else None
            if cold is not None:
                lines.append(f"| {method} get, in a fresh process | | | {_s(cold)} | | | | {rate(cold)} |")
        lines += ["", "| store | jaxckpt save / client put | jaxckpt restore / client get | jaxckpt restore / "
                  "client get in a fresh process | jaxckpt restore / client get into fresh memory | orbax save / "
                  "jaxckpt | orbax restore / jaxckpt | jaxckpt save / local save | jaxckpt restore / local restore |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for store in data["stores"]:
            j = f"jaxckpt-{store}"
            lines.append(f"| {store} | {_x(_ratio(data, wname, j, 'save', f'client-{store}'))} | "
                         f"{_x(_ratio(data, wname, j, 'restore', f'client-{store}'))} | "
                         f"{_x(_ratio(data, wname, j, 'restore', f'client-{store}', 'restore_cold'))} | "
                         f"{_x(_ratio(data, wname, j, 'restore', f'client-{store}', 'restore_fresh'))} | "
                         f"{_x(_ratio(data, wname, f'orbax-{store}', 'save', j))} | "
                         f"{_x(_ratio(data, wname, f'orbax-{store}', 'restore', j))} | "
                         f"{_x(_ratio(data, wname, j, 'save', 'jaxckpt-local'))} | "
                         f"{_x(_ratio(data, wname, j, 'restore', 'jaxckpt-local'))} |")
        lines.append("")
        lines += _ceiling_lines(data, wname, wd["bytes"])
        put = _med(_figure(data, wname, "client-gs", "save").values())
        if put is not None and "gs" in data["stores"]:
            lines += [f"client-gs put: {_s(put)}, 32 MiB objects, one media upload each (google-auth's "
                      "AuthorizedSession). client-gs get: obstore's ranged GETs (its PUTs fail on the emulator)."]
            pyget = _med([r.get("gcs_python_get_s") for r in _records(data, wname, "client-gs", "client").values()])
            if pyget is not None:
                lines[-1] += f" The same reads through google-cloud-storage (gcsclient's library): {_s(pyget)}."
            lines.append("")
        tuning = [f"{k.split('/')[0]}: put max_concurrency {v['put_concurrency']} ({_tried(v['puts'])}), "
                  f"get threads {v['get_threads']} ({_tried(v['gets'])}) on {v['bytes'] / 2**20:.0f} MiB"
                  for k, v in data["tuning"].items() if k.endswith("/" + wname)]
        if tuning:
            lines += [f"Client-alone tuning (best of {TUNE_PASSES} tries each): " + "; ".join(tuning) + ".", ""]
    if data.get("counts"):
        lines += ["## HTTP requests (W2, s3, one save / one restore, through a counting proxy)", "",
                  "| method | save requests | restore requests |", "|---|---|---|"]
        for c in data["counts"]:
            if c.get("ok"):
                lines.append(f"| {c['method']} | {c['save_total']} ({_by_method(c['save'])}) | "
                             f"{c['restore_total']} ({_by_method(c['restore'])}) |")
            else:
                lines.append(f"| {c['method']} | failed | {c.get('error', '')[-120:]} |")
        lines.append("")
    lines += ["## Targets", "", "| workload | store | target | measured | result |", "|---|---|---|---|---|"]
    for t in evaluate(data):
        value = ("n/a" if t["value"] is None else
                 f"{_b(t['rss_bytes'])} ({t['value']:.2f}x the bound)" if t["rss_bytes"] is not None
                 else f"{t['value']:.2f}x")
        result = "n/a" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        lines.append(f"| {t['workload']} | {t['store']} | {t['target']} | {value} | {result} |")
    if data.get("profile"):
        lines += ["", f"py-spy profiles of one jaxckpt save and restore per store (untimed): `{data['profile']}`."]
    failures = [r for r in data["records"] if not r["ok"]]
    if failures:
        lines += ["", "## Failed measurements", ""]
        lines += [f"* round {r['round'] + 1} {r['workload']} {r['method']} {r['phase']}: "
                  f"{r['error'].strip().splitlines()[-1][:300] if r['error'].strip() else '?'}" for r in failures]
    return "\n".join(lines) + "\n"


def _ceiling_lines(data: dict, wname: str, nbytes: int) -> list[str]:
    """What "2x faster than orbax" asks of a store against the fastest any client
    moved the same bytes in this run (curl or the client alone; medians over rounds)."""
    lines = []
    for store in data["stores"]:
        curl = _records(data, wname, f"curl-{store}", "curl")
        if not curl:
            continue
        parts = []
        for what, verb in (("save", "put"), ("restore", "get")):
            c, k = (_med(_figure(data, wname, f"{m}-{store}", what).values()) for m in ("curl", "client"))
            best = min(x for x in (c, k) if x)
            text = (f"{verb}: curl {nbytes / c / 2**20:.0f} MiB/s" + (f", client alone {nbytes / k / 2**20:.0f} MiB/s"
                                                                     if k else ""))
            orbax = _med(_figure(data, wname, f"orbax-{store}", what).values())
            if orbax:
                need = orbax / 2
                text += (f"; 2x faster than orbax's {what} ({_s(orbax)}) needs {_s(need)}, "
                         f"{nbytes / need / 2**20:.0f} MiB/s: {best / need:.2f}x the fastest {verb}")
            parts.append(text)
        lines += [f"{store}, the fastest clients of this server (curl: C, 16 MiB objects, best of "
                  f"{'/'.join(map(str, curlref.CONNECTIONS))} connections): " + "; ".join(parts) + ".", ""]
    return lines


def _tried(values: dict) -> str:
    return ", ".join(f"{c}: {x['s']:.2f} s" for c, x in values.items())


def _by_method(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda x: -x[1]))
