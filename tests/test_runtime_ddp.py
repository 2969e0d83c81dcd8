"""torchrun with 2 CPU ranks (gloo), tiny: the ranks hold bit-identical weights (network and
learnable Q, D), the run equals a single process with the same micro-batches (--grad-accum 2)
within float tolerance, evaluation and sampling over 2 ranks equal 1 rank, and a non-finite
loss on one rank stops both ranks with exit 1, no hang."""
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

import sdec
from runtime_cli_helpers import cli
from sdec.runtime import checkpoint as ckpt

REPO = pathlib.Path(__file__).resolve().parent.parent
SPEC = REPO / "specs" / "learned3.sde"
WORKER = REPO / "tests" / "ddp_worker.py"
TINY = ("--steps", "3", "--net", "mlp", "--batch-size", "8", "--eval-every", "3",
        "--sample-every", "1000", "--time-samples", "1", "--sample-steps", "2", "--log-every", "1",
        "--no-progress", "--device", "cpu")


def torchrun(*args, timeout=180, **env):
    """`torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py ARGS` → CompletedProcess."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), *[str(a) for a in args]]
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def metrics(out):
    with open(out / "metrics.jsonl", encoding="utf-8") as handle:
        return [json.loads(ln) for ln in handle if ln.strip()]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    out, dump = root / "run", root / "dump"
    done = torchrun("train", SPEC, "--out", out, *TINY, SDEC_TEST_DUMP=str(dump),
                    SDEC_TEST_ATEXIT=str(root))
    assert done.returncode == 0, done.stderr[-3000:]
    return out, dump, done


def test_ranks_end_without_interpreter_finalization(two_ranks):
    """Each rank leaves through os._exit after its work (no atexit handler ran), so gloo's
    threads cannot race a finalizing interpreter (a SIGABRT seen in about 1 launch in 15);
    the exit status and every printed line survive it."""
    out, _, done = two_ranks
    assert not list(out.parent.glob("atexit-rank-*"))
    assert done.returncode == 0 and "test BPD" in done.stdout


def test_ranks_hold_identical_weights(two_ranks):
    out, dump, done = two_ranks
    ranks = [torch.load(dump / f"rank-{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    learnable = {f"process.{n}" for n, p in sdec.compile(str(SPEC)).named_parameters() if p.requires_grad}
    assert learnable and learnable <= set(ranks[0])          # Q, D are part of the module
    assert any(k.startswith("net.") for k in ranks[0])
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k
    # the checkpoint rank 0 wrote holds the same weights, and they moved from the start
    state = ckpt.load(str(out / ckpt.LAST))
    fresh = sdec.compile(str(SPEC)).state_dict()
    for k in learnable:
        assert torch.equal(state["process"][k[len("process."):]], ranks[0][k])
        assert not torch.equal(fresh[k[len("process."):]], ranks[0][k]), k
    assert state["micro_batches"] == 2 and state["micro_size"] == 8
    # only rank 0 wrote and printed
    assert done.stdout.count("sdec train:") == 1 and "global batch 16" in done.stdout
    assert done.stdout.count("test BPD") == 1
    assert [r["step"] for r in metrics(out) if r["kind"] == "train"] == [1, 2, 3]


def test_two_ranks_equal_one_process_with_the_same_global_batch(two_ranks, tmp_path, capsys):
    out, dump, _ = two_ranks
    single = tmp_path / "single"
    rc, _, err = cli(capsys, "train", SPEC, "--out", single, *TINY, "--grad-accum", "2")
    assert rc == 0, err
    one = ckpt.load(str(single / ckpt.LAST))
    ddp = torch.load(dump / "rank-0.pt", weights_only=True)
    for part in ("net", "process"):
        for k, v in one[part].items():
            assert torch.allclose(ddp[f"{part}.{k}"].double(), v.double(), rtol=1e-5, atol=1e-7), k
    a, b = metrics(out), metrics(single)
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "val_bpd", "grad_norm"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=1e-5), key
    # and a single process with one micro-batch of 16 is a different run (the key is the
    # micro-batch), so the comparison above is not vacuous
    other = tmp_path / "batch16"
    rc, _, err = cli(capsys, "train", SPEC, "--out", other, *TINY[:4], "--batch-size", "16", *TINY[6:])
    assert rc == 0, err
    assert metrics(other)[0]["loss"] != pytest.approx(a[0]["loss"], rel=1e-5)


def test_eval_over_two_ranks_equals_one(two_ranks, capsys):
    out, _, _ = two_ranks
    # 300 examples, 8 times each: chunks of 256 // 8 = 32 examples, 10 chunks, the last partial,
    # shared out 5 and 5
    args = ("eval", out, "--limit", "300", "--time-samples", "8", "--json", "--device", "cpu")
    done = torchrun(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    rc, stdout, err = cli(capsys, *args)
    assert rc == 0, err
    two, one = json.loads(done.stdout), json.loads(stdout)
    assert two["n"] == one["n"] == 300                     # the whole split, not one rank's half
    assert two["bpd"] == pytest.approx(one["bpd"], rel=1e-12, abs=1e-12)
    for k in one["terms"]:
        assert two["terms"][k] == pytest.approx(one["terms"][k], rel=1e-12, abs=1e-12), k
    assert math.isfinite(one["bpd"])


@pytest.mark.slow
def test_sample_over_two_ranks_equals_one(two_ranks, tmp_path, capsys):
    out, _, _ = two_ranks
    png2, png1 = tmp_path / "two.png", tmp_path / "one.png"
    done = torchrun("sample", out, "-n", "5", "--steps", "3", "--out", png2, "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    rc, _, err = cli(capsys, "sample", out, "-n", "5", "--steps", "3", "--out", png1, "--device", "cpu")
    assert rc == 0, err
    with np.load(tmp_path / "two.npz") as a, np.load(tmp_path / "one.npz") as b:
        assert a["state"].shape == (5, 3, 1, 8, 8)
        assert np.array_equal(a["state"], b["state"])


@pytest.mark.slow  # a torchrun launch of its own (~15 s); the NaN report itself is in test_runtime_train
def test_non_finite_on_one_rank_stops_both(tmp_path):
    out = tmp_path / "run"
    done = torchrun("train", SPEC, "--out", out, *TINY, "--eval-every", "1", timeout=120,
                    SDEC_TEST_NAN="1:1")  # rank 1's network answers NaN from the second step
    assert done.returncode == 1, done.stderr[-3000:]
    lines = [ln for ln in done.stderr.splitlines() if "sdec train" in ln and "error" in ln]
    assert len(lines) == 1, done.stderr[-3000:]          # rank 0 reports it, once
    assert "non-finite loss at step 2" in lines[0] and "on rank 1" in lines[0]
    assert "]: Traceback" not in done.stderr   # no rank died with a traceback ([rankN]: ...)
    assert ckpt.load(str(out / ckpt.LAST))["step"] == 1  # the last good checkpoint
    assert not (out / "results.json").exists()


@pytest.mark.slow
def test_resume_under_torchrun(tmp_path, capsys):
    """2 ranks x 4 steps in one go == 2 ranks x 2 steps, then 2 ranks --resume to 4 (bitwise:
    nothing per rank to restore) == the same 2 steps, then 1 process --grad-accum 2 (floats)."""
    base = list(TINY)
    base[base.index("--steps") + 1] = "4"
    base[base.index("--eval-every") + 1] = "2"
    one_go = torchrun("train", SPEC, "--out", tmp_path / "one", *base)
    assert one_go.returncode == 0, one_go.stderr[-3000:]
    for name in ("split", "mixed"):
        first = list(base)
        first[first.index("--steps") + 1] = "2"
        done = torchrun("train", SPEC, "--out", tmp_path / name, *first)
        assert done.returncode == 0, done.stderr[-3000:]
    done = torchrun("train", SPEC, "--out", tmp_path / "split", "--steps", "4", "--resume", "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed at step 2" in done.stdout
    rc, out, err = cli(capsys, "train", SPEC, "--out", tmp_path / "mixed", "--steps", "4", "--resume",
                       "--grad-accum", "2", "--no-progress")
    assert rc == 0, err
    assert "WARNING" not in out  # ranks x --grad-accum kept: the same global batch
    one = ckpt.load(str(tmp_path / "one" / ckpt.LAST))
    split = ckpt.load(str(tmp_path / "split" / ckpt.LAST))
    mixed = ckpt.load(str(tmp_path / "mixed" / ckpt.LAST))
    assert one["step"] == split["step"] == mixed["step"] == 4
    for part in ("net", "process"):
        for k, v in one[part].items():
            assert torch.equal(v, split[part][k]), (part, k)
            assert torch.allclose(v.double(), mixed[part][k].double(), rtol=1e-5, atol=1e-7), (part, k)
    for k, v in one["ema"]["shadow"].items():
        assert torch.equal(v, split["ema"]["shadow"][k]), k


def test_resume_with_another_global_batch_warns(tmp_path, capsys):
    out = tmp_path / "run"
    first = list(TINY)
    first[first.index("--steps") + 1] = "2"
    rc, _, err = cli(capsys, "train", SPEC, "--out", out, *first)
    assert rc == 0, err
    rc, stdout, err = cli(capsys, "train", SPEC, "--out", out, "--steps", "3", "--resume",
                          "--grad-accum", "2", "--no-progress")
    assert rc == 0, err
    warning = [ln for ln in stdout.splitlines() if ln.startswith("WARNING")]
    assert len(warning) == 1 and "global batch 8" in warning[0] and "global batch 16" in warning[0]
    assert ckpt.load(str(out / ckpt.LAST))["micro_batches"] == 2


def test_leave_is_a_no_op_in_a_process_that_joined_no_group():
    from sdec.runtime import distributed
    assert not distributed.joined()
    distributed.leave(3)  # would end pytest with status 3 if it did anything
