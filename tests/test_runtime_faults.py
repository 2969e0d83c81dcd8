"""kill -9 a real training process, then --resume: it continues from the last complete
checkpoint and nothing is corrupt (the write is temp file + rename)."""
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from sdec.runtime import checkpoint as ckpt

REPO = pathlib.Path(__file__).resolve().parent.parent
ARGS = ["--steps", "30", "--net", "mlp", "--batch-size", "16", "--eval-every", "2",
        "--sample-every", "1000", "--time-samples", "1", "--sample-steps", "2", "--no-progress",
        "--device", "cpu"]


def start(out, *extra, stall_at=0):
    """`sdec train` on vpsde in a new process; with stall_at = N the N-th checkpoint write
    stops half-way (tests/fault_worker.py) and waits to be killed."""
    env = dict(os.environ, OMP_NUM_THREADS="1", SDEC_TEST_STALL_AT=str(stall_at))
    entry = [str(REPO / "tests" / "fault_worker.py")] if stall_at else ["-m", "sdec"]
    return subprocess.Popen([sys.executable, *entry, "train", str(REPO / "specs" / "vpsde.sde"),
                             "--out", str(out), *ARGS, *extra], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(predicate, timeout=120.0):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def kill_when(out, moment, *extra):
    """Start training and SIGKILL it at a moment: "first" (right after the first checkpoint
    exists), "write" (while the second checkpoint write is stalled half-way, its temporary
    file on disk) or "late" (after several checkpoints)."""
    proc = start(out, *extra, stall_at=2 if moment == "write" else 0)
    if moment == "first":
        assert wait_for(lambda: (out / ckpt.LAST).exists())
    elif moment == "write":
        assert wait_for(lambda: any(out.glob("*.tmp.stalled"))), proc.stderr.read1().decode()
        assert [p.stat().st_size > 0 for p in out.glob("*.pt.tmp")] == [True]  # half a checkpoint
    else:
        assert wait_for(lambda: len(ckpt.step_files(str(out))) >= 3 and
                        int(ckpt.step_files(str(out))[0].split("-")[-1][:-3]) >= 10)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return proc.returncode


@pytest.mark.parametrize("moment, steps", [("write", 10), pytest.param("first", 30, marks=pytest.mark.slow),
                                           pytest.param("late", 30, marks=pytest.mark.slow)])
def test_kill_9_then_resume(tmp_path, moment, steps):
    out = tmp_path / "run"
    budget = ("--steps", str(steps))
    assert kill_when(out, moment, *budget) == -signal.SIGKILL
    before = ckpt.load_latest(str(out))["step"]  # the last complete checkpoint
    proc = start(out, *budget, "--resume")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr.decode()
    assert f"resumed at step {before}".encode() in stdout
    assert ckpt.load(str(out / ckpt.LAST))["step"] == steps
    for path in ckpt.step_files(str(out)) + [str(out / ckpt.BEST)]:
        ckpt.load(path)  # every checkpoint left is complete
    assert not list(out.glob("*.pt.tmp"))  # the half-written file was replaced by a whole one
