"""Progress bars: when they draw (TTY, notebook, forced, env var), what they
count, how they draw, and that restores show one only when asked or watched."""

from __future__ import annotations

import io
import re
import sys
import threading
import types

import numpy as np
import pytest

import jaxckpt
from jaxckpt import display, progress

from helpers import FakeClock


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


pytestmark = pytest.mark.usefixtures("no_progress_env")


@pytest.fixture
def kernel(monkeypatch):
    """Pretend to run inside an IPython kernel (the only thing the detection looks at)."""
    shell = types.SimpleNamespace(kernel=object())
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))
    return shell


class FakeDisplay:
    """Records what IPython's ``display(obj, display_id=True)`` and ``handle.update(obj)`` receive."""

    def __init__(self):
        self.shown: list = []
        self.updates: list = []

    def __call__(self, obj, display_id=None):
        assert display_id is True
        self.shown.append(obj)
        return self

    def update(self, obj):
        self.updates.append(obj)


def frames(out: str) -> list[str]:
    return [f for f in out.split("\r") if f.strip()]


# ------------------------------------------------------------------ when it draws
def test_off_when_not_a_tty():
    stream = io.StringIO()
    assert progress.resolve_mode(None, 1 << 40, stream=stream) is None
    bar = progress.progress_bar("verify x", 1000, 3, stream=stream)
    bar.update(600, leaves=2)
    bar.update(400, leaves=1)
    bar.close()
    assert stream.getvalue() == ""
    assert not bar.enabled and bar.callback is None
    assert (bar.bytes_done, bar.leaves_done) == (1000, 3)  # counted all the same


def test_on_in_a_terminal_and_above_the_size_threshold():
    tty = FakeTTY()
    assert progress.resolve_mode(None, 10, stream=tty) == "terminal"
    assert progress.resolve_mode(None, 10, min_bytes=11, stream=tty) is None
    assert progress.resolve_mode(None, 11, min_bytes=11, stream=tty) == "terminal"
    bar = progress.progress_bar("restore c", 2048, stream=tty)
    assert bar.callback is bar
    bar(2048)
    bar.close()
    first, last = frames(tty.getvalue())[0], frames(tty.getvalue())[-1]
    assert tty.getvalue().startswith("\r") and tty.getvalue().endswith("\n")
    assert first == "restore c  [--------------------]   0%  0 B/2.0 KiB"
    assert last.startswith("restore c  [####################] 100%  2.0 KiB/2.0 KiB  ")
    assert re.search(r"  done in \d+\.\d s\n$", last)


def test_auto_follows_sys_stderr(monkeypatch):
    monkeypatch.setattr(sys, "stderr", FakeTTY())
    assert progress.resolve_mode(None, 1) == "terminal"
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress.resolve_mode(None, 1) is None


def test_forced_and_disabled_explicitly():
    assert progress.resolve_mode(True, 0, min_bytes=1 << 30, stream=io.StringIO()) == "terminal"
    assert progress.resolve_mode(False, 1 << 40, stream=FakeTTY()) is None


@pytest.mark.parametrize("value", ["0", "false", "OFF", " no "])
def test_env_var_disables_auto(monkeypatch, value):
    monkeypatch.setenv(progress.ENV_VAR, value)
    tty = FakeTTY()
    bar = progress.progress_bar("x", 100, stream=tty)
    bar.update(100)
    bar.close()
    assert bar.mode is None and tty.getvalue() == ""
    assert progress.resolve_mode(True, 100, stream=tty) == "terminal"  # an explicit argument still wins


@pytest.mark.parametrize("value", ["1", "true", "on"])
def test_env_var_enables_auto(monkeypatch, value):
    monkeypatch.setenv(progress.ENV_VAR, value)
    assert progress.resolve_mode(None, 1, min_bytes=1 << 30, stream=io.StringIO()) == "terminal"
    assert progress.resolve_mode(False, 1, stream=io.StringIO()) is None


def test_unknown_env_value_means_auto(monkeypatch):
    monkeypatch.setenv(progress.ENV_VAR, "maybe")
    assert progress.resolve_mode(None, 1, stream=FakeTTY()) == "terminal"
    assert progress.resolve_mode(None, 1, stream=io.StringIO()) is None


@pytest.mark.parametrize("bad", ["yes", 1, 0.0])
def test_progress_argument_must_be_bool_or_none(bad):
    with pytest.raises(TypeError, match=re.escape(f"progress must be True, False or None (auto), got "
                                                  f"{type(bad).__name__}")):
        progress.resolve_mode(bad, 1)


# ------------------------------------------------------------------ counting and drawing
def test_counts_bytes_and_leaves_exactly_from_many_threads():
    bar = progress.ProgressBar("x", 8 * 1000 * 7, 8000, mode="terminal", stream=io.StringIO())

    def work():
        for _ in range(1000):
            bar.update(7, leaves=1)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bar.close()
    assert (bar.bytes_done, bar.leaves_done) == (56000, 8000)
    assert "100%  54.7 KiB/54.7 KiB  8000/8000 leaves" in frames(bar._stream.getvalue())[-1]


def test_text_of_a_frame():
    clock = FakeClock(10.0)
    bar = progress.ProgressBar("verify ckpt", 4 << 20, 4, mode=None, clock=clock)
    bar.update(1 << 20, leaves=1)
    clock.t = 12.0
    assert bar.text() == "verify ckpt  [#####---------------]  25%  1.0 MiB/4.0 MiB  1/4 leaves  512.0 KiB/s"
    bar.update(3 << 20, leaves=3)
    assert bar.text(final=True) == ("verify ckpt  [####################] 100%  4.0 MiB/4.0 MiB  4/4 leaves  "
                                    "2.0 MiB/s  done in 2.0 s")
    bar.update(100)  # reads rounded out to whole chunks may overshoot: never shown above the total
    assert "100%  4.0 MiB/4.0 MiB" in bar.text() and bar.bytes_done == (4 << 20) + 100
    assert bar.text(final=True, ok=False).endswith("failed")


def test_redraws_are_throttled_to_the_interval():
    clock = FakeClock()
    tty = FakeTTY()
    bar = progress.ProgressBar("x", 1000, mode="terminal", stream=tty, clock=clock)
    assert len(frames(tty.getvalue())) == 1  # the first frame at once
    for _ in range(50):  # 50 updates within 49 ms: no redraw
        bar.update(1)
        clock.t += 0.001
    assert len(frames(tty.getvalue())) == 1
    clock.t += 0.1
    bar.update(1)
    assert len(frames(tty.getvalue())) == 2 and "51 B/1000 B" in frames(tty.getvalue())[-1]
    bar.close()
    assert len(frames(tty.getvalue())) == 3 and tty.getvalue().endswith("\n")
    bar.update(5)  # after close: counted, never drawn
    assert len(frames(tty.getvalue())) == 3 and bar.bytes_done == 56


def test_shorter_frames_blank_the_rest_of_the_longer_one():
    clock = FakeClock()
    tty = FakeTTY()
    bar = progress.ProgressBar("x", 0, mode="terminal", stream=tty, clock=clock)
    clock.t += 1
    bar.update(1000)
    clock.t += 999
    bar.update(24)  # the rate drops: a shorter frame
    assert tty.getvalue().split("\r")[1:] == ["x  0 B/0 B", "x  1000 B/0 B  1000 B/s", "x  1.0 KiB/0 B  1 B/s  "]


def test_leave_false_erases_the_line():
    tty = FakeTTY()
    with progress.ProgressBar("verify x", 10, mode="terminal", stream=tty, leave=False) as bar:
        bar.update(10)
    first = tty.getvalue().split("\r")[1]
    assert tty.getvalue().endswith("\r" + " " * len(first) + "\r")


def test_long_labels_are_shortened_to_the_terminal_width():
    tty = FakeTTY()  # no fileno: 100 columns assumed
    label = "verify /very/long/" + "x" * 300 + "/step_000042"
    with progress.ProgressBar(label, 10, 2, mode="terminal", stream=tty) as bar:
        bar.update(10, leaves=2)
    for frame in tty.getvalue().replace("\n", "").split("\r")[1:]:
        assert len(frame) <= 99
        assert frame.startswith("...") and "/step_000042  [" in frame


def test_a_failing_stream_silences_the_bar_not_the_work():
    class Broken(FakeTTY):
        def write(self, s):
            raise OSError(5, "Input/output error")

    bar = progress.progress_bar("x", 10, stream=Broken())
    assert bar.mode is None  # the first frame failed
    bar.update(10)
    bar.close()
    assert bar.bytes_done == 10


def test_exception_in_the_with_block_draws_failed():
    tty = FakeTTY()
    with pytest.raises(KeyError):
        with progress.ProgressBar("restore x", 100, mode="terminal", stream=tty) as bar:
            bar.update(40)
            raise KeyError("boom")
    assert tty.getvalue().endswith("  failed\n") and " 40%  40 B/100 B" in tty.getvalue()


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
                                     (5 << 20, "5.0 MiB"), (3 << 30, "3.0 GiB"), (2 << 40, "2.0 TiB"),
                                     (5 << 50, "5120.0 TiB")])
def test_format_bytes(n, text):
    assert display.format_bytes(n) == text


# ------------------------------------------------------------------ notebooks
def test_notebook_detected_only_inside_a_kernel(monkeypatch):
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    assert not progress.in_ipython_kernel()
    terminal_shell = types.SimpleNamespace()  # a terminal IPython shell has no kernel
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: terminal_shell))
    assert not progress.in_ipython_kernel()
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: None))
    assert not progress.in_ipython_kernel()


def test_notebook_mode_in_a_kernel_without_a_tty(kernel):
    assert progress.in_ipython_kernel()
    assert progress.resolve_mode(None, 1, stream=io.StringIO()) == "notebook"
    assert progress.resolve_mode(True, 1, stream=io.StringIO()) == "notebook"
    assert progress.resolve_mode(False, 1) is None
    assert progress.resolve_mode(None, 1, min_bytes=2) is None


def test_notebook_bar_updates_one_display_in_place(kernel):
    shown = FakeDisplay()
    clock = FakeClock()
    bar = progress.ProgressBar("restore <ckpt> & co", 3000, 3, mode="notebook", display=shown, clock=clock)
    for _ in range(3):
        clock.t += 1.0
        bar.update(1000, leaves=1)
    bar.close()
    assert len(shown.shown) == 1 and len(shown.updates) == 4  # one output, updated in place
    first, last = shown.shown[0], shown.updates[-1]
    assert '<progress value="0" max="3000"' in first._repr_html_()
    html = last._repr_html_()
    assert '<progress value="3000" max="3000"' in html
    assert "restore &lt;ckpt&gt; &amp; co  100%  2.9 KiB/2.9 KiB  3/3 leaves" in html and "<ckpt>" not in html
    assert "[#" not in html  # the graphical bar replaces the text one
    assert repr(last) == "restore <ckpt> & co  [####################] 100%  2.9 KiB/2.9 KiB  3/3 leaves  " \
                         "1000 B/s  done in 3.0 s"


def test_progress_bar_uses_the_display_it_is_given_in_a_kernel(kernel):
    shown = FakeDisplay()
    with progress.progress_bar("x", 10, enabled=True, display=shown) as bar:
        bar.update(10)
    assert bar.mode == "notebook" and shown.shown and "100%" in repr(shown.updates[-1])


def test_a_failing_display_silences_the_bar(kernel):
    def display(obj, display_id=None):
        raise RuntimeError("kernel gone")

    bar = progress.progress_bar("x", 10, display=display)
    bar.update(10)
    bar.close()
    assert bar.mode is None and bar.bytes_done == 10


# ------------------------------------------------------------------ restores
TREE = {"w": np.arange(3000, dtype=np.float32).reshape(30, 100), "b": np.ones(7), "n": 3}


@pytest.fixture
def ckpt(ckdir):
    jaxckpt.save(ckdir / "c", TREE)
    return ckdir / "c"


def test_restore_progress_true_draws_on_stderr(ckpt, capsys):
    got = jaxckpt.restore(ckpt, progress=True)
    np.testing.assert_array_equal(got["w"], TREE["w"])
    err = capsys.readouterr().err
    last = frames(err)[-1]
    # (the label "restore <path> (3 leaves)" is shortened from the left to fit 100 columns)
    assert re.fullmatch(r"(restore /|\.\.\.).*/c \(3 leaves\)  \[#{20}\] 100%  11\.8 KiB/11\.8 KiB  (.*/s  )?"
                        r"done in \d+\.\d s\n", last), last
    flat = jaxckpt.load_checkpoint(ckpt, progress=True)
    assert flat["n"] == 3 and "/c (3 leaves)  [####################] 100%" in frames(capsys.readouterr().err)[-1]


def test_restore_with_a_target_reports_progress(ckpt, capsys):
    got = jaxckpt.restore(ckpt, {"w": np.zeros((30, 100), np.float32)}, partial=True, progress=True)
    np.testing.assert_array_equal(got["w"], TREE["w"])
    assert " 11.7 KiB/11.8 KiB  " in frames(capsys.readouterr().err)[-1]  # only "w" was read


def test_restore_progress_off_and_auto(ckpt, capsys, monkeypatch):
    jaxckpt.restore(ckpt, progress=False)
    jaxckpt.restore(ckpt)  # auto: stderr is not a terminal here
    assert capsys.readouterr().err == ""
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    jaxckpt.restore(ckpt)  # auto in a terminal: a small checkpoint shows nothing
    assert tty.getvalue() == ""
    monkeypatch.setattr(progress, "AUTO_MIN_BYTES", 1000)  # ... a large one does
    jaxckpt.load_checkpoint(ckpt)
    assert "100%" in tty.getvalue()
    monkeypatch.setenv(progress.ENV_VAR, "0")
    before = tty.getvalue()
    jaxckpt.restore(ckpt)
    assert tty.getvalue() == before


def test_restore_rejects_a_bad_progress_argument(ckpt):
    with pytest.raises(TypeError, match="progress must be True, False or None"):
        jaxckpt.restore(ckpt, progress="auto")


def test_in_a_real_kernel_a_restore_draws_one_html_output(ckpt):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(f"import jaxckpt\nt = jaxckpt.restore({str(ckpt)!r}, progress=True)"),
                nbformat.v4.new_code_cell(f"t = jaxckpt.restore({str(ckpt)!r})  # auto: small, so no bar")]
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    first, second = (cell.outputs for cell in nb.cells)
    assert [o.output_type for o in first] == ["display_data"] and second == []  # nothing on stderr either
    total = 3000 * 4 + 7 * 8
    assert f'<progress value="{total}" max="{total}"' in first[0].data["text/html"]
    assert re.fullmatch(r"restore .*/c \(3 leaves\)  \[#{20}\] 100%  11\.8 KiB/11\.8 KiB  (.*/s  )?done in .*",
                        first[0].data["text/plain"])
