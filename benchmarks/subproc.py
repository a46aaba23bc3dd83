"""Run one measurement in a fresh Python process and collect its JSON result.

The child is `python -m MODULE [ARGS] SPEC_JSON`; it writes its result as JSON to
`spec["out"]` and exits 0, or exits `measure.EXIT_MISMATCH` when a restore
was not bit-exact, which aborts the whole benchmark.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .measure import EXIT_MISMATCH

REPO = Path(__file__).resolve().parent.parent


class RestoreMismatchAbort(SystemExit):
    """A restore returned different bytes than were saved: stop everything."""


class Runner:
    def __init__(self, module: str, scratch: Path, timeout: float, verbose: bool = False,
                 args: tuple[str, ...] = ()):
        self.module = module
        self.args = args
        self.scratch = scratch
        self.timeout = timeout
        self.verbose = verbose
        self._env = dict(os.environ)
        self._env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)

    def call(self, spec: dict) -> dict:
        """Run one child; {"ok": True, "wall_s": ..., **result} or {"ok": False, "error": ...}."""
        out = self.scratch / "worker-result.json"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", self.module, *self.args,
               json.dumps(spec | {"out": str(out)})]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=self._env, capture_output=True, text=True,
                                  timeout=self.timeout)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"timed out after {self.timeout:g} s"}
        wall = time.perf_counter() - t0
        if self.verbose and proc.stderr.strip():
            print(proc.stderr.rstrip(), file=sys.stderr)
        if proc.returncode == EXIT_MISMATCH:
            raise RestoreMismatchAbort(
                f"RESTORE IS NOT BIT-EXACT ({spec.get('method')} on {spec.get('workload')}):\n"
                f"{tail(proc.stderr)}")
        if proc.returncode != 0 or not out.exists():
            return {"ok": False, "wall_s": wall,
                    "error": f"exit status {proc.returncode}: {tail(proc.stderr)}"}
        return {"ok": True, "wall_s": wall, **json.loads(out.read_text())}


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def child_main(argv: list[str], dispatch) -> int:
    """The child side: run dispatch(spec) and write its result to spec["out"]."""
    from .measure import RestoreMismatch

    spec = json.loads(argv[0])
    try:
        result = dispatch(spec)
    except RestoreMismatch as e:
        print(f"RestoreMismatch: {e}", file=sys.stderr)
        return EXIT_MISMATCH
    Path(spec["out"]).write_text(json.dumps(result))
    return 0
