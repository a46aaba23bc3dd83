#!/usr/bin/env python3
"""Developer entry point; needs only Python 3 (>= 3.10) with venv and pip.

    python3 dev.py demo     # create .venv, install, run the interrupted-and-resumed training demo (Flax, grain)
    python3 dev.py test     # create .venv, install, run the test suite
    python3 dev.py bench    # create .venv, install, run the quick benchmark

The virtual environment is (re)installed only when pyproject.toml or
constraints.txt changed. ``test`` also installs the az:// tests' server,
Azurite (a Node.js package, pinned by tests/azurite/package-lock.json), with
``npm ci`` into .venv/azurite when that lock file changed: it needs Node.js
(>= 18) and npm.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv

ROOT = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(ROOT, ".venv")
PY = os.path.join(VENV, "bin", "python")
STAMP = os.path.join(VENV, ".jaxckpt-installed")
AZURITE_PINS = os.path.join(ROOT, "tests", "azurite")  # package.json, package-lock.json
AZURITE = os.path.join(VENV, "azurite")  # where npm installs it, with the other installed dependencies


def _fingerprint() -> str:
    h = hashlib.sha256()
    for name in ("pyproject.toml", "constraints.txt"):
        with open(os.path.join(ROOT, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def ensure_venv() -> None:
    want = _fingerprint()
    if os.path.exists(STAMP) and open(STAMP).read() == want:
        return
    if not os.path.exists(PY):
        print("creating .venv ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [PY, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    print("installing jaxckpt and its test dependencies into .venv ...", flush=True)
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    subprocess.run(pip + ["-c", "constraints.txt", "-e", ".[test]"], check=True, cwd=ROOT)
    with open(STAMP, "w") as f:
        f.write(want)


def ensure_azurite() -> None:
    """Azurite (the Azure Storage emulator the az:// tests start on 127.0.0.1),
    at the versions of its package-lock.json."""
    with open(os.path.join(AZURITE_PINS, "package-lock.json"), "rb") as f:
        want = hashlib.sha256(f.read()).hexdigest()
    stamp = os.path.join(AZURITE, "node_modules", ".jaxckpt-installed")
    if os.path.exists(stamp) and open(stamp).read() == want:
        return
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit("dev.py: npm not found: the az:// tests need Node.js (>= 18) and npm to install "
                         "their server, Azurite (e.g. apt-get install nodejs npm)")
    print("installing Azurite (npm ci into .venv/azurite) ...", flush=True)
    os.makedirs(AZURITE, exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copyfile(os.path.join(AZURITE_PINS, name), os.path.join(AZURITE, name))
    subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], check=True, cwd=AZURITE)
    with open(stamp, "w") as f:
        f.write(want)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "bench"):
        print(__doc__)
        return 2
    ensure_venv()
    if argv[0] == "test":
        ensure_azurite()
    env = dict(os.environ)
    cmd = {
        "demo": [PY, "-m", "examples.demo"],
        "test": [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        "bench": [PY, "-m", "benchmarks.run", "--quick"],
    }[argv[0]]
    return subprocess.run(cmd + argv[1:], cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
