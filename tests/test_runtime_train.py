"""`sdec train` end to end, in-process and tiny: every shipped spec, resume determinism, a
changed spec on resume, a non-finite loss, the eps objective, every data format, the mixing
monitor, the validation split, and a saved run rebuilt from its checkpoint alone."""
import contextlib
import io
import json
import math
import pathlib
import re

import numpy as np
import pytest
import torch
from PIL import Image

import sdec
from runtime_cli_helpers import FAST, cli
from sdec.cli import main
from sdec.runtime import checkpoint as ckpt
from sdec.runtime import monitor
from sdec.runtime import setup as setup_mod
from sdec.runtime import train as train_mod
from sdec.runtime.config import TrainConfig
from sdec.runtime.data import Dataset, load_dataset
from sdec.runtime.evaluate import ELBO_TERMS
from sdec.runtime.saved import load_run
from test_data import write_cifar, write_imagenet, write_mnist

REPO = pathlib.Path(__file__).resolve().parent.parent
SPECS = REPO / "specs"
ARTIFACTS = ("ckpt-last.pt", "ckpt-best.pt", "metrics.jsonl", "config.json", "results.json",
             "training.png", "process.png")


def train(capsys, spec, out, *extra, steps=2, net="mlp"):
    return cli(capsys, "train", spec, "--out", out, "--steps", steps, "--net", net, *FAST, *extra)


def one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def strict_json(line):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(line, parse_constant=refuse)


def metrics(out):
    with open(pathlib.Path(out) / "metrics.jsonl", encoding="utf-8") as handle:
        return [json.loads(ln) for ln in handle if ln.strip()]


def is_png(path):
    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) > 0
    return True


# ---------------------------------------------------------------- every shipped spec


def spec_param(name, net="mlp", slow=False):
    return pytest.param(name, net, id=f"{name}-{net}", marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("spec,net", [
    spec_param("vpsde", "tiny"), spec_param("cld"), spec_param("learned3"),
    spec_param("alda", slow=True), spec_param("malda", slow=True), spec_param("learned2", slow=True),
])
def test_every_spec_trains_samples_and_reports(spec, net, tmp_path, capsys):
    path = SPECS / f"{spec}.sde"
    assert sorted(p.stem for p in SPECS.glob("*.sde")) == sorted(
        ["vpsde", "cld", "alda", "malda", "learned2", "learned3"])
    out = tmp_path / "run"
    rc, stdout, stderr = train(capsys, path, out, "--log-every", "1", net=net)
    assert rc == 0, stderr
    proc = sdec.compile(str(path))
    K, learned = proc.K, any(p.requires_grad for p in proc.parameters())
    mixes = monitor.mixing(proc)["mixed"]  # all but alda mix by T = 1
    assert mixes == (spec != "alda")

    for name in ARTIFACTS:
        assert (out / name).is_file(), name
    assert (out / "blocks.png").is_file() == learned
    for name in ("training.png", "process.png") + (("blocks.png",) if learned else ()):
        assert is_png(out / name)
    grids = sorted((out / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["step-0000002.png"] and is_png(grids[0])

    with open(out / "metrics.jsonl", encoding="utf-8") as handle:
        records = [strict_json(ln) for ln in handle]
    assert records and all("step" in r and "kind" in r for r in records)
    assert [(r["kind"], r["step"]) for r in records] == [("train", 1), ("train", 2), ("val", 2)]
    for r in records[:2]:
        assert ("Q" in r) == learned and ("D" in r) == learned and math.isfinite(r["loss"])
        assert r["mixed"] is mixes and (r["kl_T"] <= 0.01) is mixes
        if learned:
            assert np.array(r["Q"]).shape == (K, K) == np.array(r["D"]).shape
    assert set(records[2]["terms"]) == set(ELBO_TERMS) | {"transform", "dequantization"}

    config = json.loads((out / "config.json").read_text())
    assert (config["steps"], config["net"], config["spec"]) == (2, net, str(path))
    results = json.loads((out / "results.json").read_text())
    assert (results["split"], results["step"], results["spec"], results["n"]) == ("test", 2, spec, 360)
    assert math.isfinite(results["bpd"]) and results["bpd"] > 0
    warnings = [ln for ln in stdout.splitlines() if ln.startswith("WARNING")]
    assert len(warnings) == (0 if mixes else 1) and all("mix" in ln for ln in warnings)
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("test BPD") and f"{results['bpd']:.4f}" in last

    for method in ("em", "ode"):
        png = tmp_path / "draws" / f"{method}.png"
        rc, stdout, stderr = cli(capsys, "sample", out, "-n", 4, "--method", method, "--steps", 5,
                                 "--out", png, "--device", "cpu")
        assert rc == 0, stderr
        assert is_png(png) and str(png) in stdout
        with np.load(tmp_path / "draws" / f"{method}.npz") as arrays:
            assert set(arrays.files) == {"model_space", "state", "images"}
            x, y, images = arrays["model_space"], arrays["state"], arrays["images"]
        assert x.shape == (4, 1, 8, 8) and y.shape == (4, K, 1, 8, 8) and images.shape == (4, 1, 8, 8)
        assert all(np.isfinite(a).all() for a in (x, y, images))
        assert np.array_equal(y[:, 0], x) and images.min() >= 0 and images.max() <= 1


# ---------------------------------------------------------------- resume


def checkpoint_equal(a, b, path=""):
    """Every tensor torch.equal, every other leaf ==; returns the differing paths."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        return [d for k in a for d in checkpoint_equal(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        return [d for i, (u, v) in enumerate(zip(a, b)) for d in checkpoint_equal(u, v, f"{path}/{i}")]
    if torch.is_tensor(a):
        return [] if a.dtype == b.dtype and torch.equal(a, b) else [path]
    return [] if a == b else [path]


def test_resume_is_bit_identical_to_one_go(tmp_path, capsys):
    spec = SPECS / "learned2.sde"
    opts = ("--dropout", "0.1", "--log-every", "1")
    rc, _, err = train(capsys, spec, tmp_path / "one", *opts, steps=4)
    assert rc == 0, err
    rc, _, err = train(capsys, spec, tmp_path / "two", *opts, steps=2)
    assert rc == 0, err
    half = ckpt.load(str(tmp_path / "two" / ckpt.LAST))
    # resume names only the run and the new step count: the rest comes from the checkpoint
    rc, out, err = cli(capsys, "train", spec, "--out", tmp_path / "two", "--steps", 4, "--resume")
    assert rc == 0, err
    assert "resumed at step 2" in out

    one = torch.load(tmp_path / "one" / ckpt.LAST, weights_only=True)
    two = torch.load(tmp_path / "two" / ckpt.LAST, weights_only=True)
    assert one["step"] == two["step"] == 4
    assert one["net_config"]["dropout"] == 0.1
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.1
               for m in load_run(str(tmp_path / "one"), "cpu").net.modules())
    # the process is learnable and moved, so the comparison is not vacuous
    assert any(v.requires_grad for v in sdec.compile(str(spec)).parameters())
    assert not torch.equal(half["net"][next(iter(half["net"]))], two["net"][next(iter(two["net"]))])
    for part in ("net", "process", "ema", "optimizer"):
        assert checkpoint_equal(one[part], two[part]) == [], part
    assert set(one["process"]) and one["optimizer"]["state"]
    diffs = checkpoint_equal({k: v for k, v in one.items() if k != "config"},
                             {k: v for k, v in two.items() if k != "config"})
    assert diffs == []
    assert {k for k in one["config"] if one["config"][k] != two["config"][k]} == {"out", "resume"}

    # the logged numbers of every step agree too (metrics.jsonl was truncated and continued)
    def numbers(run):
        return [(r["kind"], r["step"], r.get("loss"), r.get("val_bpd"), r.get("Q"), r.get("D"))
                for r in metrics(tmp_path / run)]
    assert numbers("one") == numbers("two")
    assert [r["step"] for r in metrics(tmp_path / "two") if r["kind"] == "train"] == [1, 2, 3, 4]


def test_resume_refuses_a_changed_spec_or_option(tmp_path, capsys):
    spec = tmp_path / "cld.sde"
    original = (SPECS / "cld.sde").read_text()
    spec.write_text(original)
    out = tmp_path / "run"
    rc, _, err = train(capsys, spec, out)
    assert rc == 0, err
    files = ("ckpt-last.pt", "ckpt-best.pt", "metrics.jsonl", "config.json")
    before = {name: (out / name).read_bytes() for name in files}

    assert "beta(t) = 4\n" in original
    spec.write_text(original.replace("beta(t) = 4\n", "beta(t) = 3\n"))
    rc, _, err = train(capsys, spec, out, "--resume", steps=4)
    line = one_line(err)
    assert rc == 2 and "spec" in line and "hash" in line
    assert {name: (out / name).read_bytes() for name in files} == before

    spec.write_text(original)
    rc, _, err = train(capsys, spec, out, "--resume", "--seed", "7", steps=4)
    line = one_line(err)
    assert rc == 2 and "--seed" in line and ckpt.LAST in line
    assert {name: (out / name).read_bytes() for name in files} == before

    rc, _, err = train(capsys, spec, tmp_path / "fresh", "--resume", steps=4)
    line = one_line(err)
    assert rc == 2 and str(tmp_path / "fresh" / ckpt.LAST) in line


# ---------------------------------------------------------------- failures while training


def test_non_finite_loss_stops_with_the_step_and_the_term(tmp_path, capsys, monkeypatch):
    real = train_mod.train_step

    def poisoned(run, step):
        if step == 2:  # the third step: from now on the network answers NaN
            run.net.register_forward_hook(lambda module, args, output: output * float("nan"))
        return real(run, step)

    monkeypatch.setattr(train_mod, "train_step", poisoned)
    out = tmp_path / "run"
    rc, _, err = train(capsys, SPECS / "vpsde.sde", out, steps=4)
    line = one_line(err)
    assert rc == 1
    assert "step 3" in line and str(out / ckpt.LAST) in line and "(step 2)" in line
    term = re.search(r"the '(\w+)' term", line)
    assert term and term.group(1) in set(ELBO_TERMS) | {"total"}
    state = torch.load(out / ckpt.LAST, weights_only=True)
    assert state["step"] == 2 and ckpt.load(str(out / ckpt.LAST))["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["net"].values())
    assert not (out / "results.json").exists()


def test_eps_objective_trains_fixed_processes_only(tmp_path, capsys):
    out = tmp_path / "eps"
    rc, stdout, err = train(capsys, SPECS / "vpsde.sde", out, "--objective", "eps", "--log-every", "1")
    assert rc == 0, err
    train_lines = [r for r in metrics(out) if r["kind"] == "train"]
    assert train_lines and all("eps_mse" in r and "train_bpd" not in r for r in train_lines)
    assert stdout.strip().splitlines()[-1].startswith("test BPD")
    rc, stdout, err = cli(capsys, "eval", out, "--limit", 4, "--json", "--device", "cpu")
    assert rc == 0, err
    assert json.loads(stdout)["n"] == 4 and math.isfinite(json.loads(stdout)["bpd"])

    rc, _, err = train(capsys, SPECS / "learned3.sde", tmp_path / "no", "--objective", "eps")
    line = one_line(err)
    assert rc == 2 and "eps trains fixed processes only" in line
    assert not (tmp_path / "no" / ckpt.LAST).exists()


def test_time_sampler_option(tmp_path, capsys):
    """--time-sampler reaches the training ELBO and is recorded; a wrong name is one line."""
    losses = {}
    for sampler in ("importance", "stratified", "uniform"):
        out = tmp_path / sampler
        rc, _, err = train(capsys, SPECS / "cld.sde", out, "--time-sampler", sampler, "--log-every", "1")
        assert rc == 0, err
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["time_sampler"] == sampler
        losses[sampler] = [r["train_bpd"] for r in metrics(out) if r["kind"] == "train"]
        assert losses[sampler] and all(math.isfinite(v) for v in losses[sampler])
    assert len({tuple(v) for v in losses.values()}) == 3      # the times (so the losses) differ
    rc, _, err = train(capsys, SPECS / "cld.sde", tmp_path / "bad", "--time-sampler", "sobol")
    line = one_line(err)
    assert rc == 2 and "sobol" in line and "stratified" in line


# ---------------------------------------------------------------- data formats


def _mnist(root):
    write_mnist(root, gz=True)


def _cifar(root):
    write_cifar(root)


def _imagenet(root):
    write_imagenet(root, npz=True)


@pytest.mark.parametrize("data,write,shape,n_test", [
    ("mnist", _mnist, (1, 28, 28), 5),
    ("cifar10", _cifar, (3, 32, 32), 5),
    ("imagenet32", _imagenet, (3, 32, 32), 3),
], ids=["mnist-idx-gz", "cifar10-py2-pickles", "imagenet32-npz"])
def test_trains_on_published_formats(data, write, shape, n_test, tmp_path, capsys):
    root = tmp_path / "data"
    write(root)
    out = tmp_path / "run"
    rc, stdout, err = train(capsys, SPECS / "vpsde.sde", out, "--data", data, "--data-dir", root)
    assert rc == 0, err
    results = json.loads((out / "results.json").read_text())
    assert (results["data"], results["n"]) == (data, n_test) and math.isfinite(results["bpd"])
    assert results["terms"]["dequantization"] == pytest.approx(8.0)  # 256 levels
    state = ckpt.load(str(out / ckpt.LAST))
    assert state["data"] == {"name": data, "shape": list(shape), "levels": 256}
    assert stdout.strip().splitlines()[-1].startswith("test BPD")


def test_trains_on_continuous_toy_data(tmp_path, capsys):
    out = tmp_path / "run"
    rc, stdout, err = train(capsys, SPECS / "cld.sde", out, "--data", "toy:moons")
    assert rc == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["n"] == 2000 and math.isfinite(results["bpd"])
    assert "dequantization" not in results["terms"] and "transform" not in results["terms"]
    assert "NLL" in stdout and "no dequantization" in stdout
    rc, stdout, err = cli(capsys, "eval", out, "--limit", 50, "--device", "cpu")
    assert rc == 0, err
    assert "NLL" in stdout and "no dequantization" in stdout
    assert not re.search(r"^\s+(dequantization|transform)\s", stdout, re.M)
    assert re.search(r"^\s+prior\s", stdout, re.M)
    rc, _, err = cli(capsys, "sample", out, "-n", 4, "--steps", 5, "--out", tmp_path / "s.png",
                     "--device", "cpu")
    assert rc == 0, err
    with np.load(tmp_path / "s.npz") as arrays:
        assert set(arrays.files) == {"model_space", "state"}
        assert arrays["model_space"].shape == (4, 2) and arrays["state"].shape == (4, 2, 2)
    assert is_png(tmp_path / "s.png")


@pytest.mark.parametrize("data,expected", [("mnist", "train-images-idx3-ubyte"),
                                           ("cifar10", "data_batch_1"),
                                           ("imagenet32", "train_data_batch_1")])
def test_missing_data_directory(data, expected, tmp_path, capsys):
    missing = tmp_path / "nothing-here"
    rc, _, err = train(capsys, SPECS / "vpsde.sde", tmp_path / "run", "--data", data,
                       "--data-dir", missing)
    line = one_line(err)
    assert rc == 2 and expected in line and str(missing) in line
    assert not (tmp_path / "run" / ckpt.LAST).exists()


# ---------------------------------------------------------------- mixing monitor, saved runs

SLOW_MIXING = (SPECS / "learned2.sde").read_text().replace("sde learned2", "sde slowmix").replace(
    "\nT = 1\n", "\nT = 0.2\n")


@pytest.fixture(scope="module")
def slow_mixing_run(tmp_path_factory):
    """A learned K = 2 spec with T = 0.2: it does not mix by T from the start."""
    root = tmp_path_factory.mktemp("slowmix")
    spec = root / "slowmix.sde"
    assert "T = 0.2" in SLOW_MIXING
    spec.write_text(SLOW_MIXING)
    out = root / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["train", str(spec), "--out", str(out), "--steps", "2", "--net", "mlp",
                   "--log-every", "1", *FAST])
    assert rc == 0
    return spec, out, printed.getvalue()


def test_mixing_monitor_warns_and_logs_q_and_d(slow_mixing_run):
    _, out, printed = slow_mixing_run
    warning = [ln for ln in printed.splitlines() if ln.startswith("WARNING")]
    assert len(warning) == 1 and "mix" in warning[0] and "KL" in warning[0]
    train_lines = [r for r in metrics(out) if r["kind"] == "train"]
    assert [r["step"] for r in train_lines] == [1, 2]
    for r in train_lines:
        assert r["kl_T"] > 0.01 and r["mixed"] is False and r["phi_T_max"] > 0.5
        Q, D = np.array(r["Q"]), np.array(r["D"])
        assert Q.shape == D.shape == (2, 2)
        assert np.allclose(Q, -Q.T, atol=1e-12) and np.allclose(D, D.T, atol=1e-12)
        assert np.linalg.eigvalsh((D + D.T) / 2).min() >= -1e-12
    results = json.loads((out / "results.json").read_text())
    assert results["mixing"]["mixed"] is False


def test_load_run_rebuilds_the_process_from_the_stored_spec(slow_mixing_run, capsys):
    spec, out, _ = slow_mixing_run
    state = ckpt.load(str(out / ckpt.BEST))
    spec.unlink()  # the run directory is self-contained
    saved = load_run(str(out), "cpu")
    assert saved.path == str(out / ckpt.BEST) and saved.step == 2
    assert saved.proc.spec_text == SLOW_MIXING and saved.proc.spec_hash == state["spec_hash"]
    assert saved.proc.spec_name == "slowmix" and float(saved.proc.T) == pytest.approx(0.2)
    shadow = state["ema"]["shadow"]
    for prefix, module in (("process.", saved.proc), ("net.", saved.net)):
        own = module.state_dict()
        assert own and all(torch.equal(v, shadow[prefix + k]) for k, v in own.items())
    assert not saved.net.training and not saved.proc.training
    fresh = sdec.compile_text(SLOW_MIXING)
    assert saved.proc.spec_hash == fresh.spec_hash
    rc, stdout, err = cli(capsys, "eval", out, "--limit", 3, "--json", "--device", "cpu")
    assert rc == 0, err
    assert json.loads(stdout)["spec"] == "slowmix"


# ---------------------------------------------------------------- the validation split


def test_validation_is_carved_from_train(monkeypatch):
    cfg = TrainConfig(spec="unused.sde", data="digits")
    splits = setup_mod.load_splits(cfg)
    assert (splits.train.shape[0], splits.val.shape[0]) == (1293, 144)
    assert (splits.shape, splits.levels, splits.name) == ((1, 8, 8), 17, "digits")
    full = load_dataset("digits", "train").data

    def rows(x):
        return sorted(r.numpy().tobytes() for r in x)
    assert rows(torch.cat([splits.train, splits.val])) == rows(full)  # a partition of train

    # by index: digits has duplicate images, so split a tensor of example numbers
    calls = []

    def numbered(name, split, data_dir=None, image_size=32):
        calls.append(split)
        return Dataset(name, split, torch.arange(1437).reshape(-1, 1), 17, None)

    monkeypatch.setattr(setup_mod, "load_dataset", numbered)
    ids = setup_mod.load_splits(cfg)
    train_ids, val_ids = set(ids.train[:, 0].tolist()), set(ids.val[:, 0].tolist())
    assert len(train_ids) == 1293 and len(val_ids) == 144
    assert not train_ids & val_ids and train_ids | val_ids == set(range(1437))
    assert calls == ["train"]  # the test split is never read
    # the same split for every run of the data set (the seed of the run does not move it)
    other = setup_mod.load_splits(TrainConfig(spec="unused.sde", data="digits", seed=7))
    assert torch.equal(other.val, ids.val) and torch.equal(other.train, ids.train)
    small = setup_mod.load_splits(TrainConfig(spec="unused.sde", data="digits", val_fraction=0.2))
    assert small.val.shape[0] == 287


def test_resume_may_lower_the_learning_rate(tmp_path, capsys):
    """After a non-finite loss the advice is `--resume --lr LOWER`: that must be accepted, and
    the rest of the configuration comes from the checkpoint, not from the defaults."""
    out = tmp_path / "run"
    assert train(capsys, SPECS / "vpsde.sde", out, "--weight-decay", "0.01")[0] == 0
    rc, stdout, err = cli(capsys, "train", SPECS / "vpsde.sde", "--out", out, "--resume",
                          "--steps", 3, "--lr", "1e-5", "--no-progress")
    assert rc == 0, err
    saved = json.loads((out / "config.json").read_text())
    assert saved["lr"] == 1e-5 and saved["weight_decay"] == 0.01 and saved["net"] == "mlp"
    assert torch.load(out / ckpt.LAST, weights_only=True)["step"] == 3


def test_rolling_checkpoints_and_fallback_from_a_corrupt_last(tmp_path, capsys):
    """The newest --keep-checkpoints step files stay beside ckpt-last.pt; a truncated
    ckpt-last.pt is reported with its path and skipped in favour of the newest good one; a
    stale temporary file from a write killed mid-way is ignored."""
    out = tmp_path / "run"
    rc, _, err = train(capsys, SPECS / "vpsde.sde", out, "--eval-every", "1", "--keep-checkpoints", "2",
                       steps=4)
    assert rc == 0, err
    steps = sorted(p.name for p in out.glob("ckpt-step-*.pt"))
    assert steps == ["ckpt-step-0000003.pt", "ckpt-step-0000004.pt"]
    assert (out / ckpt.LAST).read_bytes() == (out / "ckpt-step-0000004.pt").read_bytes()
    (out / (ckpt.LAST + ".tmp")).write_bytes(b"half a checkpoint")   # a kill mid-write
    data = (out / ckpt.LAST).read_bytes()
    (out / "ckpt-step-0000004.pt").unlink()
    (out / ckpt.LAST).write_bytes(data[: len(data) // 2])            # truncated in place
    rc, stdout, err = cli(capsys, "train", SPECS / "vpsde.sde", "--out", out, "--resume",
                          "--steps", 5, "--no-progress")
    assert rc == 0, err
    assert "skipping" in err and ckpt.LAST in err
    assert "resumed at step 3" in stdout
    assert torch.load(out / ckpt.LAST, weights_only=True)["step"] == 5
