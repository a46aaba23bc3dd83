"""Progress bars for long reads (restores, ``jaxckpt verify``): a terminal line
redrawn in place, or a notebook output updated in place; nothing when nobody is
watching.

Whether a bar draws (:func:`resolve_mode`):

* ``enabled=False``: never. ``enabled=True``: always (in a notebook when
  running inside an IPython kernel, else on the stream, TTY or not).
* ``enabled=None`` (auto): the environment variable ``JAXCKPT_PROGRESS``
  decides when set (``0``/``false``/``no``/``off``: never; ``1``/``true``/
  ``yes``/``on``: always); otherwise a bar draws only for work of at least
  ``min_bytes``, and only inside an IPython kernel or when the stream is a
  terminal. Logs of batch jobs and CI stay clean.

No dependency: the terminal bar is a carriage-return line redrawn at most ~10
times a second; the notebook bar is an HTML ``<progress>`` element shown through
an IPython display handle. IPython is used only when it is already imported and
running a kernel (we never import it to find out). A bar never fails the work it
reports on: if drawing raises (a closed stream, a dead kernel), it goes quiet.
"""

from __future__ import annotations

import html
import os
import sys
import threading
import time
from typing import Any, Callable, TextIO

from jaxckpt import display

ENV_VAR = "JAXCKPT_PROGRESS"
# Restores smaller than this finish too fast for a bar to be worth its line.
AUTO_MIN_BYTES = 256 << 20
_OFF = frozenset({"0", "false", "no", "off"})
_ON = frozenset({"1", "true", "yes", "on"})
_BAR_WIDTH = 20

Mode = str  # "terminal" | "notebook"


def in_ipython_kernel() -> bool:
    """True inside a Jupyter/IPython kernel (not a terminal IPython shell)."""
    ipy = sys.modules.get("IPython")  # never imported here: only asked if the user's process has it
    get = getattr(ipy, "get_ipython", None)
    if get is None:
        return False
    try:
        shell = get()
    except Exception:  # a half-torn-down interpreter: no notebook to draw in
        return False
    return shell is not None and getattr(shell, "kernel", None) is not None


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def resolve_mode(enabled: bool | None, total_bytes: int = 0, *, min_bytes: int = 0,
                 stream: TextIO | None = None) -> Mode | None:
    """Where a bar should draw: ``"notebook"``, ``"terminal"`` or None (nowhere)."""
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"progress must be True, False or None (auto), got {type(enabled).__name__}")
    if enabled is False:
        return None
    if enabled is None:
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env in _OFF:
            return None
        if env not in _ON:
            if total_bytes < min_bytes:
                return None
            if not in_ipython_kernel():
                return "terminal" if _isatty(sys.stderr if stream is None else stream) else None
            return "notebook"
    return "notebook" if in_ipython_kernel() else "terminal"


class _Html:
    """What a notebook displays: HTML, with a plain-text fallback."""

    def __init__(self, markup: str, text: str):
        self._markup, self._text = markup, text

    def _repr_html_(self) -> str:
        return self._markup

    def __repr__(self) -> str:
        return self._text


def _ipython_display() -> Callable[..., Any]:
    from IPython.display import display  # only reached inside a running kernel
    return display


class ProgressBar:
    """Bytes (and leaves) done out of a total, with the rate.

    ``update(nbytes, leaves)`` adds to the counts (thread-safe) and redraws at
    most every ``min_interval`` seconds; the bar itself is a valid ``progress``
    callback for ``CheckpointReader.read`` (called with a byte count). ``close``
    (or leaving the ``with`` block) draws the final state; with ``leave=False``
    a terminal line is erased instead, for callers that print their own summary.
    With ``mode=None`` nothing is drawn but the counts are still kept.
    """

    def __init__(self, label: str, total_bytes: int, total_leaves: int = 0, *, mode: Mode | None = None,
                 stream: TextIO | None = None, display: Callable[..., Any] | None = None, leave: bool = True,
                 clock: Callable[[], float] = time.monotonic, min_interval: float | None = None):
        if mode not in (None, "terminal", "notebook"):
            raise ValueError(f"mode must be 'terminal', 'notebook' or None, got {mode!r}")
        self.label = label
        self.total_bytes = max(0, int(total_bytes))
        self.total_leaves = max(0, int(total_leaves))
        self.mode = mode
        self.bytes_done = 0
        self.leaves_done = 0
        self.leave = leave
        self._stream = stream
        self._display = display
        self._handle: Any = None
        self._clock = clock
        self._interval = min_interval if min_interval is not None else (0.1 if mode == "terminal" else 0.2)
        self._lock = threading.Lock()
        self._closed = False
        self._width = 0  # length of the terminal line drawn last
        self._start = clock()
        self._last = self._start
        if mode is not None:
            self._draw(self._start)

    @property
    def enabled(self) -> bool:
        return self.mode is not None

    @property
    def callback(self) -> Callable[[int], None] | None:
        """``self`` when drawing, else None (a reader then skips the calls)."""
        return self if self.mode is not None else None

    def __call__(self, nbytes: int) -> None:
        self.update(nbytes)

    def update(self, nbytes: int = 0, leaves: int = 0) -> None:
        with self._lock:
            self.bytes_done += nbytes
            self.leaves_done += leaves
            if self.mode is None or self._closed:
                return
            now = self._clock()
            if now - self._last >= self._interval:
                self._draw(now)

    def close(self, ok: bool = True) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.mode is not None:
                self._draw(self._clock(), final=True, ok=ok)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)

    # ------------------------------------------------------------ rendering
    def text(self, now: float | None = None, final: bool = False, ok: bool = True, label: str | None = None,
             bar: bool = True) -> str:
        """The bar as one line of text (what the terminal shows; ``bar=False``:
        without the ``[###---]`` part, which a notebook draws graphically)."""
        now = self._clock() if now is None else now
        elapsed = max(0.0, now - self._start)
        total = self.total_bytes
        done = min(self.bytes_done, total) if total else self.bytes_done
        parts = [self.label if label is None else label]
        if total:
            filled = _BAR_WIDTH * done // total
            pct = f"{100 * done // total:3d}%"
            parts.append(("[" + "#" * filled + "-" * (_BAR_WIDTH - filled) + "] " + pct) if bar else pct.strip())
        parts.append(f"{display.format_bytes(done)}/{display.format_bytes(total)}")
        if self.total_leaves:
            parts.append(f"{min(self.leaves_done, self.total_leaves)}/{self.total_leaves} leaves")
        if elapsed > 0 and done:
            parts.append(f"{display.format_bytes(done / elapsed)}/s")
        if final:
            parts.append(f"done in {elapsed:.1f} s" if ok else "failed")
        return "  ".join(parts)

    def _draw(self, now: float, final: bool = False, ok: bool = True) -> None:
        self._last = now
        try:
            if self.mode == "terminal":
                self._draw_terminal(now, final, ok)
            else:
                self._draw_notebook(now, final, ok)
        except Exception:  # drawing must never break the read it reports on
            self.mode = None

    def _draw_terminal(self, now: float, final: bool, ok: bool) -> None:
        stream = sys.stderr if self._stream is None else self._stream
        if final and not self.leave:
            line = "\r" + " " * self._width + "\r"
        else:
            line = self.text(now, final, ok)
            cols = _columns(stream)
            if len(line) >= cols:  # a wrapped line cannot be redrawn with '\r': shorten the label
                rest = len(line) - len(self.label)
                room = max(8, cols - 1 - rest)
                short = self.label if len(self.label) <= room else "..." + self.label[len(self.label) - room + 3:]
                line = self.text(now, final, ok, label=short)[:cols - 1]
            pad = max(0, self._width - len(line))
            self._width = len(line)
            line = "\r" + line + " " * pad + ("\n" if final else "")
        stream.write(line)
        stream.flush()

    def _draw_notebook(self, now: float, final: bool, ok: bool) -> None:
        text = self.text(now, final, ok)
        short = self.text(now, final, ok, bar=False)
        total = self.total_bytes
        value, maximum = (min(self.bytes_done, total), total) if total else (1 if final else 0, 1)
        markup = (f'<div style="font-family: monospace; font-size: 90%; white-space: pre">'
                  f'<progress value="{value}" max="{maximum}" style="width: 24ch; vertical-align: middle">'
                  f'</progress>  {html.escape(short)}</div>')
        obj = _Html(markup, text)
        if self._handle is None:
            display = self._display if self._display is not None else _ipython_display()
            self._handle = display(obj, display_id=True)
        else:
            self._handle.update(obj)


def _columns(stream: Any) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns or 100
    except (AttributeError, ValueError, OSError):
        return 100


def progress_bar(label: str, total_bytes: int, total_leaves: int = 0, *, enabled: bool | None = None,
                 min_bytes: int = 0, stream: TextIO | None = None, display: Callable[..., Any] | None = None,
                 leave: bool = True) -> ProgressBar:
    """A :class:`ProgressBar` that draws where :func:`resolve_mode` says (possibly nowhere)."""
    mode = resolve_mode(enabled, total_bytes, min_bytes=min_bytes, stream=stream)
    return ProgressBar(label, total_bytes, total_leaves, mode=mode, stream=stream, display=display, leave=leave)


def for_restore(path: str, total_bytes: int, n_leaves: int, enabled: bool | None) -> ProgressBar:
    """The bar of ``jaxckpt.restore`` / ``load_checkpoint``: auto shows it for
    checkpoints of at least :data:`AUTO_MIN_BYTES` when someone watches."""
    return progress_bar(f"restore {path} ({n_leaves} leaves)", total_bytes, enabled=enabled,
                        min_bytes=AUTO_MIN_BYTES)
