"""Notebooks (issue 7): the two notebooks run top to bottom in a fresh kernel and
their saved copies hold the outputs of such a run; the async API works inside a
running event loop and in a kernel interrupted during a save; ``CheckpointInfo``
and ``StepMetadata`` render as HTML tables.

After editing a notebook, refresh the outputs saved in it with::

    .venv/bin/python tests/test_notebooks.py --update
"""

from __future__ import annotations

import asyncio
import dataclasses
import html.parser
import os
import queue
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import jax
import ml_dtypes
import nbformat
import numpy as np
import pytest
from jupyter_client import KernelManager
from nbclient import NotebookClient

import jaxckpt
from jaxckpt import api, display

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@dataclasses.dataclass(frozen=True)
class Expect:
    """Evidence that a run of a notebook did its job, looked for in its outputs."""
    images: int            # at least this many PNG figures
    html: tuple[str, ...]  # strings that must occur in HTML outputs
    text: tuple[str, ...]  # strings that must occur in printed text
    workdir_prefix: str    # the notebook's tempfile.mkdtemp prefix (the last cell removes it)


EXPECT = {
    "quickstart.ipynb": Expect(
        images=3, html=("<b>CheckpointInfo</b>", "<b>StepMetadata</b>", "<progress"),
        text=("committed steps: [200, 250, 300]", "missing:    ['params/hidden_2/bias', 'params/hidden_2/kernel']",
              "3 of 3 checkpoints OK", "removed "),
        workdir_prefix="jaxckpt-quickstart-"),
    "inspect_checkpoint.ipynb": Expect(
        images=1, html=("<b>CheckpointInfo</b>", "<b>StepMetadata</b>", "max |new - old|"),
        text=("checkpoints: ['30', '60']", "all 23 leaves are identical, bit for bit", "removed "),
        workdir_prefix="jaxckpt-inspect-"),
}


def execute_notebook(nb: nbformat.NotebookNode, cwd: str) -> nbformat.NotebookNode:
    """Run every cell in a fresh python3 kernel (this environment's ipykernel);
    raises ``CellExecutionError`` at the first cell that fails."""
    for cell in nb.cells:  # no output of an earlier run may pass for one of this run
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)
    # timeout=None: no per-cell deadline; a stuck cell is caught by pytest-timeout (pyproject.toml).
    client = NotebookClient(nb, timeout=None, startup_timeout=60, kernel_name="python3",
                            record_timing=False, resources={"metadata": {"path": cwd}})
    client.execute()
    return nb


def _outputs(nb: nbformat.NotebookNode) -> tuple[int, str, str, list[str]]:
    """(PNG count, all HTML, all text, error names) of a notebook's outputs."""
    images, markup, text, errors = 0, [], [], []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                text.append(out.text)
            elif out.output_type == "error":
                errors.append(f"{out.ename}: {out.evalue}")
            else:
                data = out.get("data", {})
                images += "image/png" in data
                markup.append(data.get("text/html", ""))
                text.append(data.get("text/plain", ""))
    return images, "\n".join(markup), "\n".join(text), errors


def _check_outputs(nb: nbformat.NotebookNode, expect: Expect) -> None:
    images, markup, text, errors = _outputs(nb)
    assert errors == []
    assert images >= expect.images
    for s in expect.html:
        assert s in markup, s
    for s in expect.text:
        assert s in text, s


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch):
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))  # the kernel's tempfile.mkdtemp lands here
    nb = execute_notebook(nbformat.read(NOTEBOOKS / name, as_version=4), str(cwd))
    _check_outputs(nb, EXPECT[name])
    # the run left nothing behind: not in its working directory, not in its temp dir
    assert os.listdir(cwd) == []
    assert [e for e in os.listdir(tmp) if e.startswith(EXPECT[name].workdir_prefix)] == []


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_saved_notebook_holds_the_outputs_of_one_full_run(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    # executed top to bottom in one kernel (no cell skipped, none run twice)
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    _check_outputs(nb, EXPECT[name])


# ----------------------------------------------------------------------------- asyncio
def test_async_api_inside_a_running_event_loop(ckdir):
    rng = np.random.default_rng(0)
    trees = {name: {"w": rng.standard_normal((256, 64)).astype(np.float32), "b": rng.integers(0, 9, (64,)),
                    "bf": rng.standard_normal(33).astype(ml_dtypes.bfloat16), "step": i}
             for i, name in enumerate(("a", "b", "c"))}

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        with jaxckpt.AsyncCheckpointer(max_in_flight=2) as ckptr:
            handles = [ckptr.save(ckdir / name, tree) for name, tree in trees.items()]
            await asyncio.gather(*(loop.run_in_executor(None, h.result) for h in handles))
            assert all(h.done() for h in handles)
            with pytest.raises(jaxckpt.CheckpointExistsError):
                ckptr.save(ckdir / "a", trees["a"])  # raised in the coroutine, where the mistake is made
        with jaxckpt.CheckpointManager(ckdir / "run", max_to_keep=1) as mgr:
            for step, tree in enumerate(trees.values(), 1):
                mgr.save(step, tree)
                await loop.run_in_executor(None, mgr.wait_until_finished)
            return mgr.all_steps()

    assert asyncio.run(main()) == [3]
    for name, tree in [*trees.items(), ("run/3", trees["c"])]:
        got = jaxckpt.restore(ckdir / name)
        assert got["step"] == tree["step"]
        for k in ("w", "b", "bf"):
            assert got[k].dtype == tree[k].dtype and got[k].tobytes() == tree[k].tobytes(), (name, k)


# ----------------------------------------------------------------------------- interrupted kernel
LEAF_ELEMENTS = 6 << 20  # 24 MiB of uint32 per leaf: two checksum chunks each


def _big() -> dict[str, np.ndarray]:
    return {f"w{i}": np.arange(LEAF_ELEMENTS, dtype=np.uint32) * np.uint32(2654435761 + 2 * i) for i in range(4)}


KERNEL_SETUP = '''
import os, time
import numpy as np
import jaxckpt
from jaxckpt import posixfs

RELEASE, HELD = {release!r}, {held!r}
_pwrite, _pwritev = posixfs.DataFile.pwrite, posixfs.DataFile.pwritev

def _hold():  # every data-file write says so in HELD, then waits for the test to create RELEASE
    open(HELD, "a").close()
    while not os.path.exists(RELEASE):
        time.sleep(0.005)

def held_pwrite(self, view, offset, direct=False):
    _hold()
    return _pwrite(self, view, offset, direct)

def held_pwritev(self, views, offset):
    _hold()
    return _pwritev(self, views, offset)

posixfs.DataFile.pwrite, posixfs.DataFile.pwritev = held_pwrite, held_pwritev
big = {{f"w{{i}}": np.arange({n}, dtype=np.uint32) * np.uint32(2654435761 + 2 * i) for i in range(4)}}
mgr = jaxckpt.CheckpointManager({run_dir!r}, max_to_keep=2)
print("ready")
'''


class Kernel:
    """A python3 kernel driven cell by cell."""

    def __init__(self, cwd: str):
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(cwd=cwd)
        self.kc = self.km.blocking_client()
        self.kc.start_channels()
        try:
            self.kc.wait_for_ready(timeout=60)
        except BaseException:
            self.close()
            raise

    def run(self, code: str, *, interrupt_when: Callable[[str], bool] | None = None,
            then: Callable[[], None] = lambda: None) -> tuple[dict, str]:
        """Execute a cell; return (execute_reply content, its stdout). With
        ``interrupt_when``: interrupt the kernel once it returns True (it gets
        the stdout so far), then call ``then()``."""
        msg_id = self.kc.execute(code)
        out: list[str] = []
        interrupted = False
        # No deadline here: a hang is caught by pytest-timeout (pyproject.toml), nothing is timed.
        while True:
            if interrupt_when is not None and not interrupted and interrupt_when("".join(out)):
                self.km.interrupt_kernel()
                interrupted = True
                then()
            try:
                msg = self.kc.get_iopub_msg(timeout=0.05)
            except queue.Empty:
                if not self.km.is_alive():
                    raise AssertionError(f"the kernel died; its output: {''.join(out)!r}")
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                out.append(content["text"])
            elif kind == "status" and content["execution_state"] == "idle":
                break
        while True:
            try:
                reply = self.kc.get_shell_msg(timeout=1)
            except queue.Empty:
                continue
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply["content"], "".join(out)

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def _visible_and_hidden(directory: Path) -> tuple[list[str], list[str]]:
    entries = sorted(os.listdir(directory))
    return [e for e in entries if not e.startswith(".")], [e for e in entries if e.startswith(".")]


def _assert_restores_big(path: Path) -> None:
    got = jaxckpt.load_checkpoint(path)
    want = _big()
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and got[k].tobytes() == v.tobytes(), k


def test_kernel_interrupted_during_saves_survives_and_leaves_no_partial_checkpoint(tmp_path):
    """The interrupt arrives while a save is writing: the test holds every data-file
    write in the kernel (``KERNEL_SETUP``) until it has looked at the disk."""
    run_dir, sync_dir = tmp_path / "run", tmp_path / "sync"
    release, held = tmp_path / "release", tmp_path / "held"
    sync_dir.mkdir()
    kernel = Kernel(str(tmp_path))
    try:
        reply, out = kernel.run(KERNEL_SETUP.format(release=str(release), held=str(held), n=LEAF_ELEMENTS,
                                                    run_dir=str(run_dir)))
        assert reply["status"] == "ok" and out == "ready\n", out

        # 1. An async save is writing when the interrupt arrives (the cell sleeps meanwhile).
        reply, out = kernel.run('mgr.save(7, big)\nprint("save started", flush=True)\ntime.sleep(300)',
                                interrupt_when=lambda out: "save started" in out and held.exists())
        assert (reply["status"], reply["ename"]) == ("error", "KeyboardInterrupt")
        visible, hidden = _visible_and_hidden(run_dir)
        assert visible == []  # nothing half-written under a checkpoint's name
        assert len(hidden) == 2 and re.fullmatch(r"\.7\.jaxckpt-tmp-[0-9a-f]{8,32}", hidden[0]), hidden
        assert hidden[1] == ".jaxckpt-lock"
        assert jaxckpt.CheckpointManager(run_dir, read_only=True).all_steps() == []
        # the kernel survives, and the save, which goes on in the background, commits
        release.touch()
        reply, out = kernel.run("mgr.wait_until_finished()\nprint(mgr.all_steps())")
        assert reply["status"] == "ok" and out == "[7]\n", out
        assert _visible_and_hidden(run_dir) == (["7"], [".jaxckpt-lock"])
        _assert_restores_big(run_dir / "7")

        # 2. A synchronous save interrupted mid-write: the writer removes its temporary
        # directory at once; its worker threads, still held, end once released.
        release.unlink()
        held.unlink()

        def release_once_cleaned() -> None:
            while os.listdir(sync_dir):  # a hang is caught by pytest-timeout
                time.sleep(0.01)
            release.touch()

        reply, out = kernel.run(f'print("save started", flush=True)\njaxckpt.save({str(sync_dir / "8")!r}, big)',
                                interrupt_when=lambda out: "save started" in out and held.exists(),
                                then=release_once_cleaned)
        assert (reply["status"], reply["ename"]) == ("error", "KeyboardInterrupt")
        assert os.listdir(sync_dir) == []

        # the kernel still saves and restores afterwards
        reply, out = kernel.run(f'jaxckpt.save({str(sync_dir / "9")!r}, {{"x": np.arange(5)}})\n'
                                f'print(jaxckpt.restore({str(sync_dir / "9")!r})["x"].tolist())\nmgr.close()')
        assert reply["status"] == "ok" and out == "[0, 1, 2, 3, 4]\n", out
    finally:
        release.touch()
        kernel.close()
    assert _visible_and_hidden(run_dir) == (["7"], [])  # the closed manager released its lock
    assert os.listdir(sync_dir) == ["9"]


# ----------------------------------------------------------------------------- HTML reprs
class _Tables(html.parser.HTMLParser):
    """The cells of every table row, as text (entities decoded)."""

    def __init__(self, markup: str):
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_checkpoint_info_html_is_a_table_of_leaves_with_everything_escaped(ckdir):
    tree = {"<script>alert(1)</script>": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
            "bf": np.zeros(5, ml_dtypes.bfloat16), "key": jax.random.key(0), "note": "a & <b>", "n": 3}
    jaxckpt.save(ckdir / "c", tree, metadata={"run": "<img src=x onerror=alert(1)>", "lr": 0.1})
    info = jaxckpt.inspect(ckdir / "c")
    markup = info._repr_html_()

    assert _Tables(markup).rows == [
        ["key path", "shape", "dtype", "size"],
        ["<script>alert(1)</script>/w", "(2, 3)", "float32", "24 B"],
        ["bf", "(5,)", "bfloat16", "10 B"],
        ["key", "(2,)", "uint32 (PRNG key data)", "8 B"],
        ["n", "", "Python int", "= 3"],
        ["note", "", "Python str", "= 'a & <b>'"],
    ]
    # nothing from the checkpoint reaches the markup unescaped
    for raw in ("<script>", "<img", "<b>'", "a & "):
        assert raw not in markup
    assert "&lt;script&gt;alert(1)&lt;/script&gt;/w" in markup and "&lt;img src=x onerror=alert(1)&gt;" in markup
    header = markup[:markup.index("<table>")]
    assert f"<code>{info.path}</code>" in header
    assert "format v1 &middot; 5 leaves &middot; 42 B &middot; written by jaxckpt 0.1.0" in header
    assert f"created {display.local_time(info.created)}" in header
    assert "{&#x27;lr&#x27;: 0.1, &#x27;run&#x27;: &#x27;&lt;img src=x onerror=alert(1)&gt;&#x27;}" in header
    # the text repr is unchanged
    assert repr(info).splitlines()[:2] == [
        f"CheckpointInfo({info.path!r}, format v1, 5 leaves, 42 B, written by jaxckpt 0.1.0)",
        "  <script>alert(1)</script>/w: float32[2, 3]  24 B"]


def test_checkpoint_info_html_caps_the_rows_and_survives_a_bad_timestamp():
    leaves = tuple(api.LeafInfo(f"p/{i}", "array", (i,), "int8", i) for i in range(api.HTML_MAX_ROWS + 5))
    info = api.CheckpointInfo("/x", 1, "jaxckpt 0.1.0", float("nan"), None, 123, leaves)
    markup = info._repr_html_()
    rows = _Tables(markup).rows
    assert len(rows) == 1 + api.HTML_MAX_ROWS + 1
    assert rows[-2] == [f"p/{api.HTML_MAX_ROWS - 1}", f"({api.HTML_MAX_ROWS - 1},)", "int8",
                        f"{api.HTML_MAX_ROWS - 1} B"]
    assert rows[-1] == ["... 5 more leaves"]
    assert "created nan" in markup and "metadata" not in markup


def test_step_metadata_html_is_a_small_escaped_table(ckdir):
    with jaxckpt.CheckpointManager(ckdir, step_format="{step}_{epoch}") as mgr:
        mgr.save(3, {"x": np.zeros(4, np.float32)}, epoch=1, metrics={"loss": np.float32(0.25), "tag": "<i>"},
                 metadata={"<b>": 1})
        mgr.wait_until_finished()
        meta = mgr.metadata(3)
    markup = meta._repr_html_()
    assert _Tables(markup).rows == [
        ["step", "3"], ["epoch", "1"], ["reason", "interval"], ["saved", display.local_time(meta.timestamp)], ["size", "16 B"],
        ["metrics['loss']", "0.25"], ["metrics['tag']", "'<i>'"], ["metadata", "{'<b>': 1}"],
        ["versions", f"jax {jax.__version__}, jaxckpt {jaxckpt.__version__}"], ["path", str(ckdir / "3_1")]]
    assert markup.startswith("<b>StepMetadata</b>\n<table>") and markup.count("<b>") == 1 and "<i>" not in markup
    assert repr(meta).startswith("StepMetadata(step=3, epoch=1, reason='interval', saved ")


def test_step_metadata_html_of_a_checkpoint_no_manager_wrote(ckdir):
    jaxckpt.save(ckdir / "5", {"x": np.ones(2)}, metadata=["free", "<form>"])
    meta = jaxckpt.CheckpointManager(ckdir, read_only=True).metadata(5)
    rows = dict(_Tables(meta._repr_html_()).rows)
    assert rows["reason"] == "(not written by a CheckpointManager)"
    assert rows["metadata"] == "['free', '<form>']" and "versions" not in rows
    # a timestamp that is not a valid time is shown as a number, in both reprs
    bad = dataclasses.replace(meta, timestamp=float("inf"))
    assert "saved inf" in repr(bad) and dict(_Tables(bad._repr_html_()).rows)["saved"] == "inf"


# ----------------------------------------------------------------------------- refreshing the notebooks
def update_notebooks() -> None:
    """Execute each notebook in a scratch directory and save it with its outputs."""
    for name, expect in sorted(EXPECT.items()):
        path = NOTEBOOKS / name
        nb = nbformat.read(path, as_version=4)
        with tempfile.TemporaryDirectory() as cwd:
            t0 = time.monotonic()
            execute_notebook(nb, cwd)
            _check_outputs(nb, expect)
        nbformat.validate(nb)
        nbformat.write(nb, path)
        print(f"{path}: executed in {time.monotonic() - t0:.1f} s and saved with its outputs")


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit(f"usage: {sys.argv[0]} --update   (re-execute the notebooks and save their outputs)")
    update_notebooks()
