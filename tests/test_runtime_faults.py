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


def start(out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "sdec", "train", str(REPO / "specs" / "vpsde.sde"),
                             "--out", str(out), *ARGS, *extra], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(predicate, timeout=120.0):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def kill_when(out, moment):
    """Start training and SIGKILL it at a moment: "first" (right after the first checkpoint
    exists), "write" (while a checkpoint's temporary file exists, i.e. mid-write) or "late"
    (after several checkpoints)."""
    proc = start(out)
    if moment == "first":
        wait_for(lambda: (out / ckpt.LAST).exists())
    elif moment == "write":
        wait_for(lambda: (out / ckpt.LAST).exists())
        wait_for(lambda: any(out.glob("*.tmp")), timeout=60)
    else:
        wait_for(lambda: len(ckpt.step_files(str(out))) >= 3 and
                 int(ckpt.step_files(str(out))[0].split("-")[-1][:-3]) >= 10)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return proc.returncode


@pytest.mark.parametrize("moment", ["write", pytest.param("first", marks=pytest.mark.slow),
                                    pytest.param("late", marks=pytest.mark.slow)])
def test_kill_9_then_resume(tmp_path, moment):
    out = tmp_path / "run"
    assert kill_when(out, moment) == -signal.SIGKILL
    before = ckpt.load_latest(str(out))["step"]  # the last complete checkpoint
    proc = start(out, "--resume")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr.decode()
    assert f"resumed at step {before}".encode() in stdout
    assert ckpt.load(str(out / ckpt.LAST))["step"] == 30
    for path in ckpt.step_files(str(out)) + [str(out / ckpt.BEST)]:
        ckpt.load(path)  # every checkpoint left is complete
