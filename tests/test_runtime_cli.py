"""The runtime's command line: `sdec eval` (every term, JSON), checkpoints that refuse to run
code, `sdec data`, and the hygiene of every subcommand (help, one-line errors, exit 2)."""
import json
import math
import os
import pathlib
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from runtime_cli_helpers import FAST, cli
from sdec.cli import main
from sdec.runtime import checkpoint as ckpt
from sdec.runtime.evaluate import ELBO_TERMS

REPO = pathlib.Path(__file__).resolve().parent.parent
SPECS = REPO / "specs"
TERMS = set(ELBO_TERMS) | {"transform", "dequantization"}
assert TERMS == {"prior", "score", "score_norm", "divergence", "truncation", "aux_entropy",
                 "transform", "dequantization"}


def one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """learned3 (K = 3: every ELBO term is non-zero), 2 steps of the MLP on digits."""
    out = tmp_path_factory.mktemp("cli") / "run"
    rc = main(["train", str(SPECS / "learned3.sde"), "--out", str(out), "--steps", "2",
               "--net", "mlp", *FAST])
    assert rc == 0
    return out


@pytest.fixture
def run_copy(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


# ---------------------------------------------------------------- sdec eval


def test_eval_json_every_term(run, capsys):
    rc, out, err = cli(capsys, "eval", run, "--json", "--device", "cpu")
    assert rc == 0, err
    result = json.loads(out)  # the whole of stdout is one JSON object
    assert isinstance(result, dict)
    assert {"bpd", "bpd_stderr", "method", "split", "n", "terms", "spec", "step"} <= set(result)
    assert (result["method"], result["split"], result["n"], result["spec"], result["step"]) == (
        "elbo", "test", 360, "learned3", 2)
    assert result["checkpoint"] == str(run / ckpt.BEST)
    assert set(result["terms"]) == TERMS
    assert all(math.isfinite(v) for v in result["terms"].values())
    assert result["terms"]["aux_entropy"] != 0 and result["terms"]["dequantization"] == pytest.approx(
        math.log2(17))
    assert abs(sum(result["terms"].values()) - result["bpd"]) < 1e-6
    assert math.isfinite(result["bpd_stderr"]) and 0 < result["bpd_stderr"] < 1

    rc, out, err = cli(capsys, "eval", run, "--json", "--limit", 10, "--device", "cpu")
    assert rc == 0, err
    limited = json.loads(out)
    assert limited["n"] == 10 and abs(sum(limited["terms"].values()) - limited["bpd"]) < 1e-6

    rc, out, err = cli(capsys, "eval", run, "--json", "--limit", 10, "--split", "train",
                       "--device", "cpu")
    assert rc == 0, err
    assert json.loads(out)["split"] == "train" and json.loads(out)["n"] == 10


def test_eval_is_reproducible_with_its_seed(run, capsys):
    outs = [cli(capsys, "eval", run, "--json", "--limit", 5, "--device", "cpu", *seed)[1]
            for seed in ((), ("--seed", "0"), ("--seed", "1"))]
    first, again, other = (json.loads(o) for o in outs)
    assert first["bpd"] == again["bpd"] and first["bpd"] != other["bpd"]


def test_eval_ode(run, capsys):
    rc, out, err = cli(capsys, "eval", run, "--method", "ode", "--limit", 4, "--json",
                       "--device", "cpu")
    assert rc == 0, err
    result = json.loads(out)
    assert (result["method"], result["n"]) == ("ode", 4)
    assert math.isfinite(result["median_bpd"]) and math.isfinite(result["bpd"])
    assert isinstance(result["far_from_prior"], int) and 0 <= result["far_from_prior"] <= 4
    assert {"prior", "divergence", "transform", "dequantization"} <= set(result["terms"])
    assert sum(result["terms"].values()) == pytest.approx(result["bpd"], abs=1e-4)


def test_eval_text_names_every_term(run, capsys):
    rc, out, err = cli(capsys, "eval", run, "--limit", 10, "--device", "cpu")
    assert rc == 0, err
    for term in sorted(TERMS) + ["total"]:
        assert any(line.split()[:1] == [term] for line in out.splitlines()), term
    assert "±" in out and "bits/dim" in out and "n = 10" in out and str(run / ckpt.BEST) in out


@pytest.mark.parametrize("args,flag", [(("--limit", "0"), "--limit"),
                                       (("--time-samples", "0"), "--time-samples"),
                                       (("--time-samples", "-1"), "--time-samples"),
                                       (("--split", "val"), "--split")])
def test_eval_bad_values(run, capsys, args, flag):
    rc, _, err = cli(capsys, "eval", run, *args, "--device", "cpu")
    assert rc == 2 and flag in one_line(err)


# ---------------------------------------------------------------- checkpoints


def test_checkpoints_load_weights_only(run):
    for name in (ckpt.LAST, ckpt.BEST):
        state = torch.load(run / name, weights_only=True)
        assert state["format"] == "sdec-checkpoint" and state["version"] == 1
        assert state["step"] == 2 and state["spec_text"] == (SPECS / "learned3.sde").read_text()
        assert {"net", "process", "ema", "optimizer", "rng", "spec_hash", "config",
                "net_config", "data"} <= set(state)


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
@pytest.mark.parametrize("command", ["eval", "sample"])
def test_checkpoint_that_runs_code_is_refused(run_copy, tmp_path, capsys, writer, command):
    marker = tmp_path / "pwned"
    path = run_copy / ckpt.BEST  # what `sdec eval RUN` loads
    payload = {"format": "sdec-checkpoint", "version": 1, "step": Evil(marker)}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path)
    extra = ("--out", tmp_path / "x.png") if command == "sample" else ("--limit", "2")
    rc, out, err = cli(capsys, command, run_copy, *extra, "--device", "cpu")
    line = one_line(err)
    assert rc == 2 and str(path) in line and f"sdec {command}: error" in line
    assert not marker.exists() and not (tmp_path / "x.png").exists()


def test_truncated_checkpoint(run_copy, capsys):
    path = run_copy / ckpt.BEST
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    rc, _, err = cli(capsys, "eval", path, "--limit", "2", "--device", "cpu")
    assert rc == 2 and str(path) in one_line(err)
    rc, _, err = cli(capsys, "eval", run_copy, "--limit", "2", "--device", "cpu")
    assert rc == 2 and str(path) in one_line(err)


def test_run_directory_without_checkpoint(run_copy, tmp_path, capsys):
    (run_copy / ckpt.BEST).unlink()
    rc, out, err = cli(capsys, "eval", run_copy, "--limit", "2", "--json", "--device", "cpu")
    assert rc == 0, err  # falls back to the last checkpoint
    assert json.loads(out)["checkpoint"] == str(run_copy / ckpt.LAST)
    (run_copy / ckpt.LAST).unlink()
    for command, extra in (("eval", ()), ("sample", ("--out", tmp_path / "x.png"))):
        rc, _, err = cli(capsys, command, run_copy, *extra, "--device", "cpu")
        line = one_line(err)
        assert rc == 2 and str(run_copy) in line and ckpt.LAST in line
    rc, _, err = cli(capsys, "eval", tmp_path / "no-such-run", "--device", "cpu")
    assert rc == 2 and "no-such-run" in one_line(err)


# ---------------------------------------------------------------- sdec data


def test_data_digits_json_and_text(capsys):
    rc, out, err = cli(capsys, "data", "digits", "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert set(info) == {"train", "test"}
    for split, n in (("train", 1437), ("test", 360)):
        part = info[split]
        assert (part["n"], part["shape"], part["levels"]) == (n, [1, 8, 8], 17)
        assert isinstance(part["channel_mean"], list) and len(part["channel_mean"]) == 1
        assert 0 < part["channel_mean"][0] < 16
    rc, out, err = cli(capsys, "data", "digits")
    assert rc == 0, err
    assert "train" in out and "test" in out and "1437" in out and "360" in out
    rc, _, err = cli(capsys, "data", "svhn")
    assert rc == 2 and "svhn" in one_line(err)


# ---------------------------------------------------------------- hygiene


@pytest.mark.parametrize("command", ["train", "eval", "sample", "data"])
def test_help(command, capsys):
    rc, out, _ = cli(capsys, command, "--help")
    assert rc == 0 and out.startswith(f"usage: sdec {command}")


def test_train_help_in_a_subprocess():
    done = subprocess.run([sys.executable, "-m", "sdec", "train", "--help"], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    for flag in ("--resume", "--objective", "--data-dir", "--no-progress", "--dropout"):
        assert flag in done.stdout
    assert done.stderr == ""


@pytest.mark.parametrize("argv", [
    ("train", SPECS / "vpsde.sde", "--bogus"),
    ("train", SPECS / "vpsde.sde", "--steps", "many"),
    ("train",),
    ("eval", "somewhere", "--bogus"),
    ("eval", "somewhere", "--method", "mcmc"),
    ("sample", "somewhere"),  # --out is required
    ("sample", "somewhere", "--out", "x.png", "--method", "rk4"),
    ("data", "digits", "--bogus"),
    ("frobnicate",),
], ids=lambda a: " ".join(str(x) for x in a) if isinstance(a, tuple) else str(a))
def test_usage_errors_are_one_line(argv, capsys):
    rc, out, err = cli(capsys, *argv)
    line = one_line(err)
    assert rc == 2 and line.startswith("sdec") and "error" in line and out == ""


def test_missing_spec(tmp_path, capsys):
    rc, _, err = cli(capsys, "train", tmp_path / "nope.sde", "--out", tmp_path / "run", *FAST)
    assert rc == 2 and "nope.sde" in one_line(err)


@pytest.mark.parametrize("args,names", [
    (("--steps", "0"), "--steps"),
    (("--batch-size", "0"), "--batch-size"),
    (("--objective", "foo"), "foo"),
    (("--device", "tpu"), "tpu"),
    (("--lr", "-1"), "--lr"),
    (("--val-fraction", "0.7"), "--val-fraction"),
    (("--ema-decay", "1"), "--ema-decay"),
    (("--data", "svhn"), "svhn"),
    (("--net", "resnet"), "resnet"),
    (("--transform", "sqrt"), "sqrt"),
])
def test_bad_values_are_one_line(args, names, tmp_path, capsys):
    rc, out, err = cli(capsys, "train", SPECS / "vpsde.sde", "--out", tmp_path / "run",
                       "--steps", "2", "--net", "mlp", *FAST, *args)
    line = one_line(err)
    assert rc == 2 and names in line and line.startswith("sdec train: error:")
    assert not (tmp_path / "run" / ckpt.LAST).exists()
    if names != "sqrt":  # --transform is only checked by the first step, after config.json
        assert not (tmp_path / "run" / "config.json").exists()


def test_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rc, _, err = cli(capsys, "train", SPECS / "vpsde.sde", "--out", blocker / "run", "--steps", "2",
                     "--net", "mlp", *FAST)
    assert rc == 2 and "--out" in one_line(err)
