"""--precision bf16 (autocast of the network's forward only, the process math outside it in
float32/float64) on the CPU code path, --compile, and the start-up disk-space check."""
import json
import math
import pathlib

import pytest
import torch

from runtime_cli_helpers import FAST, cli
from sdec.runtime import checkpoint as ckpt
from sdec.runtime import setup as setup_mod
from sdec.runtime.config import TrainConfig
from sdec.runtime.train import build_run
from sdec.runtime.step import train_step

REPO = pathlib.Path(__file__).resolve().parent.parent
SPECS = REPO / "specs"


def tiny_run(tmp_path, spec, **kw):
    cfg = TrainConfig(spec=str(SPECS / spec), out=str(tmp_path / "run"), steps=2, net="mlp",
                      batch_size=8, device="cpu", progress=False, **kw)
    return build_run(cfg, explicit=frozenset())


def test_bf16_autocasts_the_network_only(tmp_path):
    run = tiny_run(tmp_path, "learned3.sde", precision="bf16")
    seen = {"net": [], "process": []}

    def net_hook(module, args, output):
        seen["net"].append((torch.is_autocast_enabled("cpu"), output.dtype))

    run.net.out.register_forward_hook(net_hook)  # the network's last layer
    real = run.proc.perturb

    def perturb(*args, **kwargs):  # called by the ELBO where it does not fuse, with its K x K algebra
        out = real(*args, **kwargs)
        seen["process"].append((torch.is_autocast_enabled("cpu"), out.y.dtype))
        seen["process"].append((torch.is_autocast_enabled("cpu"), out.chol.dtype))
        return out

    run.proc.perturb = perturb
    kernels = run.proc._elbo_kernels

    def elbo_kernels(*args):  # the fused path makes the perturbation in its own node
        out = kernels(*args)
        if out is not None and out["y"] is not None:
            seen["process"].append((torch.is_autocast_enabled("cpu"), out["y"].dtype))
            seen["process"].append((torch.is_autocast_enabled("cpu"), out["L"].dtype))
        return out

    run.proc._elbo_kernels = elbo_kernels
    numbers = [train_step(run, s) for s in range(2)]
    assert seen["net"] and all(seen["net"][i] == (True, torch.bfloat16) for i in range(len(seen["net"])))
    assert seen["process"] and all(not on and dt in (torch.float32, torch.float64)
                                   for on, dt in seen["process"])
    loss, terms = run.objective(run.splits.train[:4], torch.Generator().manual_seed(0))
    assert all(v.dtype == torch.float32 for v in terms.values())  # not bf16
    for n in numbers:
        assert all(math.isfinite(v) for v in n.values())
    assert all(p.dtype in (torch.float32, torch.float64) for p in run.net.parameters())
    # fp32 is the default on CPU: no autocast at all
    fp32 = tiny_run(tmp_path, "learned3.sde")
    assert fp32.cfg.precision == "fp32" and fp32.objective.autocast is None
    seen["net"].clear()
    fp32.net.out.register_forward_hook(net_hook)
    train_step(fp32, 0)
    assert seen["net"] == [(False, torch.float32)]


def test_bf16_trains_end_to_end_on_cpu(tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = cli(capsys, "train", SPECS / "cld.sde", "--out", out, "--steps", 2, "--net", "mlp",
                     "--precision", "bf16", *FAST)
    assert rc == 0, err
    assert json.loads((out / "config.json").read_text())["precision"] == "bf16"
    assert math.isfinite(json.loads((out / "results.json").read_text())["bpd"])
    rc, _, err = cli(capsys, "train", SPECS / "cld.sde", "--out", tmp_path / "bad", "--precision", "fp8", *FAST)
    assert rc == 2 and "fp8" in err and "bf16" in err and len(err.strip().splitlines()) == 1


def test_too_little_disk_space_is_one_line_at_start_up(tmp_path, capsys, monkeypatch):
    free = {"bytes": 10 ** 6}
    real = setup_mod.shutil.disk_usage

    def disk_usage(path):
        total, used, _ = real(path)
        return type(real(path))(total, used, free["bytes"])

    monkeypatch.setattr(setup_mod.shutil, "disk_usage", disk_usage)
    out = tmp_path / "run"
    rc, stdout, err = cli(capsys, "train", SPECS / "vpsde.sde", "--out", out, "--steps", 2,
                          "--net", "mlp", *FAST)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert str(out) in lines[0] and "disk space" in lines[0] and "--keep-checkpoints" in lines[0]
    assert not (out / ckpt.LAST).exists() and "sdec train:" not in stdout  # nothing trained
    # the estimate follows the parameter count: 5 checkpoints of 4 copies of the weights
    run_need = re_mb(lines[0], "need about")
    one = re_mb(lines[0], "written, ")
    assert run_need == pytest.approx(5 * one, rel=0.01)
    free["bytes"] = int(run_need * 2 ** 20 * 1.01) + 2 ** 20
    rc, _, err = cli(capsys, "train", SPECS / "vpsde.sde", "--out", out, "--steps", 2,
                     "--net", "mlp", *FAST)
    assert rc == 0, err


def re_mb(line, after):
    import re
    m = re.search(re.escape(after) + r"\s*([\d,.]+) MB", line)
    assert m, line
    return float(m.group(1).replace(",", ""))


@pytest.mark.slow
def test_compile_trains_the_same_weights(tmp_path, capsys):
    runs = {}
    for name, extra in (("eager", ()), ("compiled", ("--compile",))):
        out = tmp_path / name
        rc, _, err = cli(capsys, "train", SPECS / "vpsde.sde", "--out", out, "--steps", 2,
                         "--net", "mlp", *FAST, *extra)
        assert rc == 0, err
        runs[name] = ckpt.load(str(out / ckpt.LAST))
    a, b = runs["eager"]["net"], runs["compiled"]["net"]
    assert a.keys() == b.keys()  # no _orig_mod. prefix: the checkpoint holds the plain network
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
