"""The README's demo command runs end to end: interrupted, resumed, bit-exact (state, batches, losses)."""

import os
import subprocess
import sys

import pytest

import jaxckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_demo(workdir, *extra):
    cmd = [sys.executable, "-m", "examples.demo", "--dir", str(workdir), "--steps", "120", "--fail-at", "70",
           "--save-every", "25", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.splitlines()


CHECKS = ["run 1 was interrupted as planned", "the state restored by run 2 is bit-identical to the state run 1 saved",
          "run 2 finished the run", "the batches after the resume equal the uninterrupted run's, bit for bit",
          "the resumed losses equal the uninterrupted run's, bit for bit"]


@pytest.mark.parametrize("interrupt, saved_at, reason", [("exception", 69, "exception"), ("sigterm", 70, "preemption")])
def test_demo_interrupts_resumes_and_continues_the_curve(tmp_path, interrupt, saved_at, reason):
    lines = run_demo(tmp_path / "demo", "--interrupt", interrupt)
    assert [ln for ln in lines if "FAILED" in ln] == []
    for check in CHECKS + [f"run 2 resumed from the {interrupt} checkpoint at step {saved_at}"]:
        assert f"  OK     {check}" in lines
    assert f"[run 2] resumed from step {saved_at} ({reason} checkpoint)" in lines
    # the grain pipeline's position as run 1 saved it: one batch drawn per step (the exception
    # arrived after batch 70 was drawn; the state saved is that of save(69, ...))
    assert f"[run 2] data iterator restored to {{'next_index': {saved_at}}}" in lines
    listing = [ln.split()[:3] for ln in lines if ln.startswith("  step ")]
    assert listing == [["step", "25", "interval"], ["step", "50", "interval"], ["step", str(saved_at), reason]]
    stopped = [ln for ln in lines if ln.endswith("<- run 1 stopped here")]
    resumed = [ln for ln in lines if ln.endswith("<- run 2 resumed here")]
    assert len(stopped) == 1 and stopped[0].split()[0] == str(saved_at) and stopped[0].split()[2] == "-"
    assert len(resumed) == 1 and resumed[0].split()[0] == str(saved_at + 1) and resumed[0].split()[1] == "-"
    # run 2's loss at its first step equals the uninterrupted run's
    assert resumed[0].split()[2] == resumed[0].split()[3]
    with jaxckpt.CheckpointManager(tmp_path / "demo" / "ckpt", read_only=True) as mgr:
        assert mgr.all_steps() == [75, 100, 120]
        assert mgr.metadata(120).reason == "forced"
        assert mgr.restore()["step"] == 120


def test_demo_refuses_a_directory_it_did_not_make(tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    proc = subprocess.run([sys.executable, "-m", "examples.demo", "--dir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"{tmp_path} exists and was not made by this demo; pass another --dir"
    assert (tmp_path / "mine.txt").read_text() == "precious"
