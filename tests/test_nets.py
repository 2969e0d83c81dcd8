"""Tests of sdec.runtime.nets: shapes, parameter counts, initialization, gradients,
per-example independence, time embedding, rebuilding from config, errors, overfitting."""
import json

import pytest
import torch

from sdec.runtime.nets import NETS, build_net, default_preset, timestep_embedding

CASES = [("tiny", (1, 8, 8)), ("mnist", (1, 28, 28)), ("tiny", (3, 32, 32)),
         ("mlp", (2,)), ("mlp", (1, 8, 8))]
CHEAP = [("tiny", (1, 8, 8)), ("mlp", (2,))]


def _state(K, data_shape, batch=2, seed=0, dtype=torch.float32):
    """A random state (batch, K, *data_shape) and times in (0, 1]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(batch, K, *data_shape, generator=g, dtype=dtype)
    t = torch.rand(batch, generator=g, dtype=dtype).clamp_min(1e-5)
    return y, t


def _perturb(net, scale=0.05, seed=1):
    """Add noise to every parameter so that the zero-initialized output layer is nonzero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net


def _n_params(net):
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("preset,data_shape", CASES)
def test_shape_and_dtype(preset, data_shape, K):
    net = build_net(preset, K=K, data_shape=data_shape)
    y, t = _state(K, data_shape)
    out = net(y, t)
    assert out.shape == y.shape and out.dtype == y.dtype


@pytest.mark.parametrize("preset,data_shape", CHEAP)
def test_float64_input_gives_float64_output_and_scalar_t(preset, data_shape):
    net = _perturb(build_net(preset, K=2, data_shape=data_shape)).eval()
    y, t = _state(2, data_shape, dtype=torch.float64)
    out = net(y, t)
    assert out.shape == y.shape and out.dtype == torch.float64
    t0 = torch.full((2,), 0.3, dtype=torch.float64)
    torch.testing.assert_close(net(y, 0.3), net(y, t0))


def test_cifar_counts_shapes_and_one_forward():
    counts = {}
    for K in (1, 2, 3):
        with torch.device("meta"):  # construction without memory or initialization cost
            net = build_net("cifar", K=K, data_shape=(3, 32, 32))
            y = torch.empty(1, K, 3, 32, 32)
            assert net(y, torch.empty(1)).shape == y.shape
        counts[K] = _n_params(net)
    assert abs(counts[1] - 35.7e6) <= 0.01 * 35.7e6, counts
    assert counts[1] < counts[2] < counts[3]
    net = build_net("cifar", K=1, data_shape=(3, 32, 32)).eval()
    y, t = _state(1, (3, 32, 32), batch=1)
    with torch.no_grad():
        out = net(y, t)
    assert out.shape == y.shape and torch.all(out == 0)


def test_mnist_parameter_count():
    with torch.device("meta"):
        n = _n_params(build_net("mnist", K=1, data_shape=(1, 28, 28)))
    assert 1.2e6 <= n <= 1.8e6, n


@pytest.mark.parametrize("preset,data_shape", CHEAP + [("mnist", (1, 28, 28))])
def test_zero_init_then_gradients_reach_every_parameter(preset, data_shape):
    torch.manual_seed(0)
    net = build_net(preset, K=3, data_shape=data_shape, dropout=0.0)
    y, t = _state(3, data_shape, batch=4)
    assert torch.all(net(y, t) == 0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for step in range(2):
        opt.zero_grad()
        loss = (net(y, t) - y).pow(2).mean()
        loss.backward()
        if step == 1:  # first step moved the zero output layer; now everything is reached
            for name, p in net.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
    assert net(y, t).abs().max() > 0


@pytest.mark.parametrize("preset,data_shape", CHEAP + [("tiny", (1, 9, 9))])
def test_examples_are_independent_in_eval_mode(preset, data_shape):
    net = _perturb(build_net(preset, K=2, data_shape=data_shape)).eval()
    y, t = _state(2, data_shape, batch=5)
    with torch.no_grad():
        batched = net(y, t)
        single = torch.cat([net(y[i:i + 1], t[i:i + 1]) for i in range(5)])
    assert batched.abs().max() > 0
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)


def test_time_embedding_finite_and_distinct():
    times = torch.tensor([1e-5, 1e-3, 1.0])
    emb = timestep_embedding(times, 128)
    assert emb.shape == (3, 128) and torch.isfinite(emb).all()
    for i in range(3):
        for j in range(i + 1, 3):
            assert (emb[i] - emb[j]).abs().max() > 1e-3, (times[i], times[j])
    net = _perturb(build_net("tiny", K=1, data_shape=(1, 8, 8))).eval()
    feats = net.temb(times)
    assert torch.isfinite(feats).all()
    assert torch.cdist(feats, feats).triu(1)[torch.triu(torch.ones(3, 3), 1) > 0].min() > 1e-4


@pytest.mark.parametrize("preset,data_shape", [("tiny", (1, 8, 8)), ("mnist", (1, 28, 28)),
                                               ("cifar", (3, 32, 32)), ("mlp", (2,)),
                                               ("tiny", (1, 28, 28))])
def test_rebuild_from_config(preset, data_shape):
    with torch.device("meta"):
        net = build_net(preset, K=3, data_shape=data_shape, dropout=0.2)
        config = json.loads(json.dumps(net.config))  # plain primitives only
        again = build_net(**config)
    assert config["preset"] == preset and config["K"] == 3 and config["dropout"] == 0.2
    assert config["data_shape"] == list(data_shape)
    a, b = net.state_dict(), again.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    assert again.config == net.config


def test_overrides_and_padding_to_a_multiple():
    net = build_net("tiny", K=2, data_shape=(1, 28, 28), ch=16, ch_mult=(1, 2, 2, 2))
    assert net.config["ch_mult"] == [1, 2, 2, 2]
    y, t = _state(2, (1, 28, 28))
    assert net(y, t).shape == y.shape  # 28 padded to 32 for three downsamplings


def test_default_dropout_and_presets():
    assert set(NETS) == {"tiny", "mnist", "cifar", "mlp"}
    assert build_net("tiny", K=1, data_shape=(1, 8, 8)).config["dropout"] == 0.1
    assert build_net("mlp", K=1, data_shape=2).config["dropout"] == 0.0
    assert default_preset((1, 8, 8)) == "tiny"
    assert default_preset((3, 16, 16)) == "tiny"
    assert default_preset((1, 28, 28)) == "mnist"
    assert default_preset((3, 32, 32)) == "cifar"
    assert default_preset((2,)) == "mlp" and default_preset(5) == "mlp"


def test_errors():
    with pytest.raises(ValueError, match="valid presets.*mlp"):
        build_net("resnet", K=1, data_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="mlp"):
        build_net("tiny", K=1, data_shape=(2,))
    with pytest.raises(ValueError, match="unknown U-Net settings"):
        build_net("tiny", K=1, data_shape=(1, 8, 8), width=3)
    net = build_net("tiny", K=2, data_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        net(torch.zeros(4, 3, 1, 8, 8), torch.rand(4))
    with pytest.raises(ValueError, match="t must have shape"):
        net(torch.zeros(4, 2, 1, 8, 8), torch.rand(3))


def test_tiny_unet_overfits_a_fixed_batch():
    torch.manual_seed(0)
    net = build_net("tiny", K=3, data_shape=(1, 8, 8), dropout=0.0)
    y, t = _state(3, (1, 8, 8), batch=8, seed=2)
    eps = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):  # the loss is below 1/10 of its start after ~25 steps
        opt.zero_grad()
        loss = (net(y, t) - eps).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-5:]) < losses[0] / 10, (losses[0], losses[-5:])
