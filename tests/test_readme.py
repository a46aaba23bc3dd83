"""The README's runnable code blocks run (issue 7).

Convention: a fenced ```python block is runnable when the line right before its
opening fence is exactly ``<!-- runnable -->`` (an HTML comment: invisible on
GitHub). All runnable blocks of one README run in order in ONE fresh Python
process, so a later block may use names an earlier one defined, in a temporary
working directory, with 8 virtual CPU devices. A traceback names the README
and the line in it.

A marker not directly followed by a ```python fence is an error, not a block
silently skipped; so is a README with no runnable block at all.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = ["README.md"]  # relative to the repository root; each must hold runnable blocks
MARKER = "<!-- runnable -->"
_OPEN = re.compile(r"(?P<indent>[ \t]*)```[ \t]*python[ \t]*")
_CLOSE = re.compile(r"[ \t]*```[ \t]*")
RUN_TIMEOUT_S = 240

# Runs in the child process: argv[1] is a JSON list of [file name, first line, code].
RUNNER = r'''
import json, sys, traceback
namespace = {"__name__": "__main__"}
blocks = json.load(open(sys.argv[1], encoding="utf-8"))
for n, (name, line, code) in enumerate(blocks, 1):
    print(f"### block {n} of {len(blocks)} ({name}, line {line})", flush=True)
    try:
        # leading newlines: tracebacks give the line number in the README itself
        exec(compile("\n" * (line - 1) + code, name, "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        print(f"### block {n} FAILED ({name}, line {line})", flush=True)
        sys.exit(1)
    sys.stdout.flush()
print("### all blocks ran", flush=True)
'''


@dataclasses.dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the block's first code line in the README
    code: str


def runnable_blocks(text: str, name: str = "README.md") -> list[Block]:
    """The runnable blocks of a Markdown text, in order; ValueError for a marker
    without a block or a block that is never closed."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        if lines[i].strip() != MARKER:
            i += 1
            continue
        fence = lines[i + 1] if i + 1 < len(lines) else None
        m = _OPEN.fullmatch(fence) if fence is not None else None
        if m is None:
            raise ValueError(f"{name}, line {i + 1}: {MARKER} must be followed on the next line by a ```python "
                             f"fence, found {fence!r}")
        indent = len(m.group("indent"))
        j = i + 2
        while j < len(lines) and not _CLOSE.fullmatch(lines[j]):
            j += 1
        if j == len(lines):
            raise ValueError(f"{name}, line {i + 2}: the runnable block opened here is never closed")
        # a block indented in a list item: drop the fence's indentation
        body = [ln[indent:] if ln[:indent].strip() == "" else ln.lstrip() for ln in lines[i + 2:j]]
        blocks.append(Block(i + 3, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


@dataclasses.dataclass(frozen=True)
class Run:
    returncode: int
    output: str  # stdout and stderr, interleaved


def run_blocks(blocks: list[Block], name: str) -> Run:
    """Run the blocks in order in one fresh interpreter, in a temporary working directory."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    with tempfile.TemporaryDirectory(prefix="readme-") as tmp:
        spec, cwd = Path(tmp) / "blocks.json", Path(tmp) / "cwd"
        spec.write_text(json.dumps([[name, b.line, b.code] for b in blocks]), encoding="utf-8")
        cwd.mkdir()
        (cwd / "tests").symlink_to(ROOT / "tests")  # README examples name test data as from the repository root
        proc = subprocess.run([sys.executable, "-c", RUNNER, str(spec)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=RUN_TIMEOUT_S)
    return Run(proc.returncode, proc.stdout)


# ----------------------------------------------------------------------------- the real README
@pytest.mark.parametrize("readme", READMES)
def test_runnable_blocks_of_the_readme_run(readme):
    path = ROOT / readme
    assert path.is_file(), f"{path} is missing"
    blocks = runnable_blocks(path.read_text(encoding="utf-8"), readme)
    assert blocks, (f"{readme} has no runnable block: mark each ```python block that must run with "
                    f"{MARKER} on the line right before it")
    res = run_blocks(blocks, readme)
    assert res.returncode == 0, res.output
    assert res.output.rstrip().endswith("### all blocks ran"), res.output


# ----------------------------------------------------------------------------- the extractor itself
SAMPLE = """\
# Title

<!-- runnable -->
```python
x = 1
```

Not marked, not run:

```python
raise SystemExit("never")
```

<!-- runnable -->
```bash
pip install jaxckpt
```
"""


def test_extractor_takes_only_marked_python_blocks():
    text = SAMPLE.replace("<!-- runnable -->\n```bash", "```bash") + (
        "1. In a list:\n\n"
        "   <!-- runnable -->\n"
        "   ```python\n"
        "   def f():\n"
        "       return x + 1\n"
        "\n"
        "   ```\n"
        "<!-- runnable -->  \n"
        "```python  \n"
        "y = f()\n"
        "```\n")
    assert runnable_blocks(text) == [Block(5, "x = 1\n"), Block(21, "def f():\n    return x + 1\n\n"),
                                     Block(27, "y = f()\n")]
    assert runnable_blocks("# nothing to run\n\n```python\nx = 1\n```\n") == []


@pytest.mark.parametrize("text, message", [
    (SAMPLE, "README.md, line 14: <!-- runnable --> must be followed on the next line by a ```python fence, "
             "found '```bash'"),
    ("<!-- runnable -->\n\n```python\nx = 1\n```\n", "README.md, line 1: .* found ''"),
    ("text\n<!-- runnable -->", "README.md, line 2: .* found None"),
    ("<!-- runnable -->\n```python\nx = 1\n", "README.md, line 2: the runnable block opened here is never closed"),
])
def test_extractor_rejects_a_marker_without_its_block(text, message):
    with pytest.raises(ValueError, match=message if ".*" in message else re.escape(message)):
        runnable_blocks(text)


def test_blocks_share_one_process_and_run_in_a_temporary_directory(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        "<!-- runnable -->\n```python\nimport os\nimport jax\nstart = os.getcwd()\n"
        "open('written.txt', 'w').write('x')\nprint('devices', jax.device_count())\n```\n"
        "<!-- runnable -->\n```python\nprint('same process:', os.getcwd() == start, sorted(os.listdir('.')))\n"
        "print('cwd', start)\n```\n", encoding="utf-8")
    res = run_blocks(runnable_blocks(readme.read_text(encoding="utf-8")), "README.md")
    assert res.returncode == 0, res.output
    lines = res.output.splitlines()
    assert lines[:4] == ["### block 1 of 2 (README.md, line 3)", "devices 8", "### block 2 of 2 (README.md, line 11)",
                         "same process: True ['tests', 'written.txt']"]  # tests: a link to the repository's
    assert lines[5:] == ["### all blocks ran"]
    cwd = lines[4].removeprefix("cwd ")
    assert not os.path.exists(cwd)  # the working directory was temporary, and is gone
    assert os.listdir(tmp_path) == ["README.md"]


def test_a_failing_block_fails_the_run_and_names_its_readme_line():
    text = ("<!-- runnable -->\n```python\nx = 1\n```\n"
            "<!-- runnable -->\n```python\ny = 2\nraise ValueError(f'boom {x + y}')\n```\n"
            "<!-- runnable -->\n```python\nprint('not reached')\n```\n")
    res = run_blocks(runnable_blocks(text), "README.md")
    assert res.returncode == 1
    assert 'File "README.md", line 8, in <module>' in res.output
    assert "ValueError: boom 3" in res.output
    assert res.output.rstrip().endswith("### block 2 FAILED (README.md, line 7)")
    assert "not reached" not in res.output and "### block 3" not in res.output
