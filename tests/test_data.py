"""Data readers over byte-exact fixtures of the published formats (nothing is downloaded)."""
import gzip
import pickle
import pickletools
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from sdec.runtime.data import DATASETS, DataError, Dataset, describe, format_description
from sdec.runtime.data import load_dataset
from sdec.runtime.data.safe_pickle import get_key, safe_load

# ---------------------------------------------------------------- fixture writers


def py2_pickle(obj) -> bytes:
    """A protocol-2 pickle with the opcodes Python 2's cPickle wrote: a Python-2 ``str``
    (our bytes) is SHORT_BINSTRING/BINSTRING, and a numpy array is
    numpy.core.multiarray._reconstruct(ndarray, (0,), 'b') then BUILD with
    (1, shape, dtype('u1'), False, raw data), the dtype itself dtype('u1', 0, 1) + BUILD."""
    out = bytearray(b"\x80\x02")
    _emit(obj, out)
    return bytes(out + b".")


def _emit(obj, out):
    if isinstance(obj, np.ndarray):
        out += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
        _emit((0,), out)
        _emit(b"b", out)
        out += b"\x87R(K\x01"  # TUPLE3 REDUCE, then MARK for the state tuple, version 1
        _emit(obj.shape, out)
        out += b"cnumpy\ndtype\n"
        _emit((obj.dtype.str[1:].encode(), 0, 1), out)
        out += b"R"
        _emit((3, b"|", None, None, None, -1, -1, 0), out)
        out += b"b\x89"  # BUILD the dtype, NEWFALSE (not Fortran order)
        _emit(obj.tobytes(), out)
        out += b"tb"  # TUPLE, BUILD the array
    elif isinstance(obj, dict):
        out += b"}(" if obj else b"}"
        for key, value in obj.items():
            _emit(key, out)
            _emit(value, out)
        out += b"u" if obj else b""
    elif isinstance(obj, (list, tuple)):
        out += b"](" if isinstance(obj, list) else b"("
        for item in obj:
            _emit(item, out)
        out += b"e" if isinstance(obj, list) else b"t"
    elif obj is None or isinstance(obj, bool):
        out += {None: b"N", True: b"\x88", False: b"\x89"}[obj]
    elif isinstance(obj, int):
        out += b"K" + bytes([obj]) if 0 <= obj < 256 else b"J" + struct.pack("<i", obj)
    elif isinstance(obj, bytes):
        out += (b"U" + bytes([len(obj)]) if len(obj) < 256
                else b"T" + struct.pack("<I", len(obj))) + obj
    else:
        raise TypeError(obj)


def planar(n, r, g, b):
    """n CIFAR rows (n, 3072) whose R, G, B planes hold the constants r, g, b."""
    rows = np.empty((n, 3, 1024), np.uint8)
    rows[:, 0], rows[:, 1], rows[:, 2] = r, g, b
    return rows.reshape(n, 3072)


def write_cifar(root, test_rows=None):
    """cifar-10-batches-py with 5 train batches of 2 images (image j of batch i: R=i,
    G=100+j, B=200) and a test batch of 5 (R=7, G=8, B=9, R pixel (3, 5) of image 0 = 255)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        rows = np.concatenate([planar(1, i, 100 + j, 200) for j in range(2)])
        batch = {b"batch_label": b"training batch %d of 5" % i, b"labels": [i, 9 - i],
                 b"data": rows, b"filenames": [b"a.png", b"b.png"]}
        (folder / f"data_batch_{i}").write_bytes(py2_pickle(batch))
    if test_rows is None:
        test_rows = planar(5, 7, 8, 9)
        test_rows[0, 3 * 32 + 5] = 255
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": list(range(len(test_rows))),
             b"data": test_rows, b"filenames": [b"t.png"] * len(test_rows)}
    (folder / "test_batch").write_bytes(py2_pickle(batch))
    return folder


def idx(array, magic) -> bytes:
    """An IDX file: big-endian magic, big-endian int32 sizes, the raw uint8 bytes."""
    return struct.pack(f">I{array.ndim}i", magic, *array.shape) + array.tobytes()


def write_mnist(folder, n_train=10, n_test=5, hw=(28, 28), gz=False):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind, array, magic in (("images", rng.integers(0, 256, (n, *hw), np.uint8), 0x803),
                                   ("labels", rng.integers(0, 10, n, np.uint8), 0x801)):
            raw = idx(array, magic)
            name = f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
            (folder / (name + ".gz" if gz else name)).write_bytes(
                gzip.compress(raw) if gz else raw)
    return folder


# ---------------------------------------------------------------- interface and errors


def test_registry_and_bad_names(tmp_path):
    assert set(DATASETS) == {"digits", "mnist", "cifar10", "imagenet32"}
    with pytest.raises(DataError, match="digits, mnist, cifar10, imagenet32, folder:PATH"):
        load_dataset("svhn", "train", str(tmp_path))
    with pytest.raises(DataError, match="toy:moons"):
        load_dataset("toy:spiral", "train")
    with pytest.raises(DataError, match="split 'val'"):
        load_dataset("digits", "val")


def test_missing_files_message_names_files_layout_and_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("SDEC_DATA", str(tmp_path / "here"))
    for name, files in (("mnist", "train-images-idx3-ubyte"), ("cifar10", "data_batch_1"),
                        ("imagenet32", "val_data")):
        with pytest.raises(DataError) as err:
            load_dataset(name, "train")
        message = str(err.value)
        assert "\n" not in message and files in message and str(tmp_path / "here") in message
    monkeypatch.delenv("SDEC_DATA")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"MNIST files in data: .*MNIST/raw/"):
        load_dataset("mnist", "test")


# ---------------------------------------------------------------- MNIST (IDX)


@pytest.mark.parametrize("layout,gz", [("", False), ("", True), ("MNIST/raw", True),
                                       ("mnist", False)])
def test_mnist_layouts(tmp_path, layout, gz):
    write_mnist(tmp_path / layout, gz=gz)
    train = load_dataset("mnist", "train", str(tmp_path))
    test = load_dataset("mnist", "test", str(tmp_path))
    assert (train.n, test.n, train.shape, train.levels) == (10, 5, (1, 28, 28), 256)
    assert train.data.dtype == torch.uint8 and train.labels.dtype == torch.int64
    raw = (tmp_path / layout / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))).read_bytes()
    raw = gzip.decompress(raw) if gz else raw
    assert test.data.numpy().tobytes() == raw[16:]


def test_mnist_uses_header_size(tmp_path):
    write_mnist(tmp_path, hw=(7, 9))
    assert load_dataset("mnist", "train", str(tmp_path)).shape == (1, 7, 9)


@pytest.mark.parametrize("damage,message", [
    (lambda raw: b"\x00\x00\x08\x02" + raw[4:], "magic 0x00000802"),
    (lambda raw: raw[:-1], "truncated"),
    (lambda raw: raw + b"\x00", "extra bytes"),
    (lambda raw: raw[:10], "truncated IDX header"),
])
def test_mnist_damaged_images(tmp_path, damage, message):
    write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError, match=message) as err:
        load_dataset("mnist", "train", str(tmp_path))
    assert str(path) in str(err.value)


def test_mnist_count_mismatch_and_missing_partner(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(idx(np.zeros(9, np.uint8), 0x801))
    with pytest.raises(DataError, match="9 labels for 10 images") as err:
        load_dataset("mnist", "train", str(tmp_path))
    assert str(path) in str(err.value)
    path.unlink()
    with pytest.raises(DataError, match="missing train-labels-idx1-ubyte"):
        load_dataset("mnist", "train", str(tmp_path))


def test_mnist_corrupt_gzip(tmp_path):
    write_mnist(tmp_path, gz=True)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not gzip")
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset("mnist", "test", str(tmp_path))


# ---------------------------------------------------------------- CIFAR-10 and safe pickles


def test_py2_fixture_loads_with_bytes_and_latin1(tmp_path):
    folder = write_cifar(tmp_path)
    raw = (folder / "test_batch").read_bytes()
    ops = {op.name for op, _, _ in pickletools.genops(raw)}
    assert {"SHORT_BINSTRING", "BINSTRING", "GLOBAL"} <= ops and "BINUNICODE" not in ops
    as_bytes = safe_load(folder / "test_batch", encoding="bytes")
    as_str = safe_load(str(folder / "test_batch"), encoding="latin1")
    assert b"data" in as_bytes and "data" in as_str
    for batch in (as_bytes, as_str):
        assert np.array_equal(get_key(batch, "data", "x"), as_bytes[b"data"])
        assert get_key(batch, "labels", "x") == [0, 1, 2, 3, 4]


def test_cifar_channels_pixels_and_splits(tmp_path):
    write_cifar(tmp_path)
    train = load_dataset("cifar10", "train", str(tmp_path))
    test = load_dataset("cifar10", "test", str(tmp_path))
    assert (train.n, test.n, train.shape, test.levels) == (10, 5, (3, 32, 32), 256)
    assert train.data.dtype == torch.uint8
    assert train.labels.tolist() == [1, 8, 2, 7, 3, 6, 4, 5, 5, 4]
    assert (train.data[:, 0].flatten(1).float().mean(1) == torch.tensor(
        [1., 1, 2, 2, 3, 3, 4, 4, 5, 5])).all()
    marked = test.data[0, 0] == 255
    assert marked[3, 5] and marked.sum() == 1
    clean = test.data.clone()
    clean[0, 0, 3, 5] = 7
    for channel, value in enumerate((7, 8, 9)):
        assert (clean[:, channel] == value).all()


@pytest.mark.parametrize("sub", ["cifar-10-batches-py", "cifar10"])
def test_cifar_directory_layouts(tmp_path, sub):
    folder = write_cifar(tmp_path / "x")
    data_dir = folder if sub == "cifar-10-batches-py" else tmp_path / "y"
    if sub == "cifar10":
        (data_dir / "cifar10").mkdir(parents=True)
        folder.rename(data_dir / "cifar10" / "cifar-10-batches-py")
    assert load_dataset("cifar10", "test", str(data_dir)).n == 5


def test_cifar_bad_row_length_truncation_and_missing_batch(tmp_path):
    folder = write_cifar(tmp_path, test_rows=np.zeros((2, 3000), np.uint8))
    with pytest.raises(DataError, match=r"test_batch: 'data' has shape \(2, 3000\)"):
        load_dataset("cifar10", "test", str(tmp_path))
    raw = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="data_batch_2: truncated"):
        load_dataset("cifar10", "train", str(tmp_path))
    (folder / "data_batch_2").unlink()
    with pytest.raises(DataError, match="missing data_batch_2 "):
        load_dataset("cifar10", "train", str(tmp_path))


class Evil:
    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return self.call, (self.arg,)


@pytest.mark.parametrize("call", ["os.system", "builtins.eval", "subprocess.Popen"])
def test_malicious_pickle_is_refused(tmp_path, call):
    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    module, name = call.split(".")
    target = getattr(__import__(module), name)
    arg = f"__import__('os').system({command!r})" if name == "eval" else command
    if name == "Popen":
        arg = ["touch", str(marker)]
    folder = write_cifar(tmp_path)
    (folder / "data_batch_3").write_bytes(pickle.dumps({"data": Evil(target, arg)}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_3: refused to unpickle \w+\.\w+: only "
                       r"dicts, lists, bytes, str, numbers and numpy arrays are allowed "
                       r"in CIFAR-10 files"):
        load_dataset("cifar10", "train", str(tmp_path))
    assert not marker.exists()


# ---------------------------------------------------------------- ImageNet32


def write_imagenet(root, npz: bool, skip=None):
    """Imagenet32_train (10 batches of 2) and Imagenet32_val (3 rows), pickles or .npz."""
    rng = np.random.default_rng(1)
    files = {f"Imagenet32_train/train_data_batch_{i}": 2 for i in range(1, 11)}
    files["Imagenet32_val/val_data"] = 3
    for rel, n in files.items():
        if rel.endswith(f"_{skip}"):
            continue
        data = rng.integers(0, 256, (n, 3072), np.uint8)
        labels = [1000, 1] if n == 2 else np.array([5, 6, 7])
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if npz:
            np.savez(str(path) + ".npz", data=data, labels=np.asarray(labels))
        else:
            path.write_bytes(pickle.dumps({"data": data, "labels": labels,
                                           "mean": np.zeros(3072)}))


@pytest.mark.parametrize("npz", [False, True])
def test_imagenet32(tmp_path, npz):
    write_imagenet(tmp_path, npz)
    train = load_dataset("imagenet32", "train", str(tmp_path))
    test = load_dataset("imagenet32", "test", str(tmp_path))
    assert (train.n, test.n, train.shape, train.levels) == (20, 3, (3, 32, 32), 256)
    assert train.labels.tolist()[:4] == [1000, 1, 1000, 1] and test.labels.tolist() == [5, 6, 7]
    suffix = ".npz" if npz else ""
    first = tmp_path / "Imagenet32_val" / ("val_data" + suffix)
    rows = np.load(first)["data"] if npz else pickle.loads(first.read_bytes())["data"]
    assert np.array_equal(test.data.reshape(3, 3072).numpy(), rows)


def test_imagenet32_missing_batch_and_bad_labels(tmp_path):
    write_imagenet(tmp_path, npz=True, skip=7)
    with pytest.raises(DataError, match="missing train_data_batch_7 "):
        load_dataset("imagenet32", "train", str(tmp_path))
    np.savez(tmp_path / "Imagenet32_val" / "val_data.npz",
             data=np.zeros((1, 3072), np.uint8), labels=np.array([0]))
    with pytest.raises(DataError, match="outside 1..1000"):
        load_dataset("imagenet32", "test", str(tmp_path))


# ---------------------------------------------------------------- digits


def test_digits():
    train = load_dataset("digits", "train", "/nonexistent")
    test = load_dataset("digits", "test")
    assert isinstance(train, Dataset) and (train.n, test.n) == (1437, 360)
    assert train.shape == (1, 8, 8) and train.levels == 17 and train.data.dtype == torch.uint8
    assert int(train.data.max()) == 16 and int(train.data.min()) == 0
    again = load_dataset("digits", "train")
    assert torch.equal(train.data, again.data) and torch.equal(train.labels, again.labels)
    from sklearn.datasets import load_digits
    assert int(train.data.sum() + test.data.sum()) == int(load_digits().images.sum())


def test_digits_split_is_scikit_learns_and_loading_it_imports_no_scikit_learn(monkeypatch):
    """The loader reads scikit-learn's file itself; the split must still be exactly
    train_test_split(test_size=0.2, random_state=0) of load_digits()."""
    from sdec.runtime.data.digits import load_digits_split
    import builtins
    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name == "sklearn" or name.startswith("sklearn."):
            raise ImportError(f"the digits loader imported {name}")
        return real_import(name, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(builtins, "__import__", no_sklearn)
        assert load_digits_split("train").n == 1437
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    bunch = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(np.rint(bunch.images).astype(np.uint8), bunch.target,
                                                        test_size=0.2, random_state=0)
    for split, images, labels in (("train", x_train, y_train), ("test", x_test, y_test)):
        got = load_dataset("digits", split)
        assert np.array_equal(got.data.squeeze(1).numpy(), images)
        assert np.array_equal(got.labels.numpy(), labels)


def test_a_damaged_or_missing_digits_file_is_a_data_error_naming_it(tmp_path, monkeypatch):
    from sdec.runtime.data import digits
    bad = tmp_path / "digits.csv.gz"
    with gzip.open(bad, "wt") as handle:
        handle.write("1,2,3\n4,5,6\n")
    monkeypatch.setattr(digits, "digits_file", lambda: str(bad))
    with pytest.raises(DataError, match=r"digits\.csv\.gz: expected 1797 rows of 64 pixel counts"):
        load_dataset("digits", "train")
    bad.write_bytes(b"\x1f\x8b not gzip")
    with pytest.raises(DataError, match=r"digits\.csv\.gz: cannot read"):
        load_dataset("digits", "train")


# ---------------------------------------------------------------- folder


def save(path, mode, size, value=128, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path, format=fmt)


def test_folder_mixed_is_rgb_and_resized(tmp_path):
    save(tmp_path / "a" / "grey.png", "L", (20, 30), 50)
    save(tmp_path / "b" / "rgb.PNG", "RGB", (40, 25), (10, 200, 30))
    save(tmp_path / "c.jpg", "RGB", (33, 33), (255, 0, 0))
    save(tmp_path / "d.JPEG", "L", (17, 12), 90)
    save(tmp_path / "e.png", "RGBA", (8, 8), (1, 2, 3, 4))
    (tmp_path / "notes.txt").write_text("not an image")
    train = load_dataset(f"folder:{tmp_path}", "train", image_size=16)
    test = load_dataset(f"folder:{tmp_path}", "test", image_size=16)
    assert (train.n, test.n, train.shape, train.levels) == (4, 1, (3, 16, 16), 256)
    every = torch.cat([train.data, test.data])
    # the grey PNG became R = G = B = 50; the RGB PNG kept its channels
    assert any(bool((img == 50).all()) for img in every)
    assert any(bool((img[0] == 10).all() and (img[1] == 200).all()) for img in every)
    again = load_dataset(f"folder:{tmp_path}", "test", image_size=16)
    assert torch.equal(again.data, test.data)


def test_folder_grey_only_and_train_test_subfolders(tmp_path):
    for i in range(3):
        save(tmp_path / "train" / f"{i}.png", "L", (10 + i, 10), 10 * i)
    Image.fromarray(np.full((6, 9), 65535, np.uint16)).save(tmp_path / "train" / "deep.png")
    save(tmp_path / "test" / "x.jpg", "L", (12, 12), 77)
    train = load_dataset(f"folder:{tmp_path}", "train", image_size=8)
    test = load_dataset(f"folder:{tmp_path}", "test", image_size=8)
    assert (train.n, test.n, train.shape) == (4, 1, (1, 8, 8))
    assert [int(img.float().mean().round()) for img in train.data] == [0, 10, 20, 255]


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        load_dataset(f"folder:{tmp_path / 'nope'}", "train")
    with pytest.raises(DataError, match="0 .png/.jpg/.jpeg images under " + str(tmp_path)):
        load_dataset(f"folder:{tmp_path}", "train")
    save(tmp_path / "ok.png", "L", (5, 5))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="broken.png: unreadable image"):
        load_dataset(f"folder:{tmp_path}", "train")


# ---------------------------------------------------------------- toy


@pytest.mark.parametrize("toy", ["checkerboard", "moons", "swissroll", "8gaussians"])
def test_toy(toy):
    train = load_dataset(f"toy:{toy}", "train")
    test = load_dataset(f"toy:{toy}", "test")
    assert (train.n, test.n, train.shape, train.levels, train.labels) == (20000, 2000, (2,),
                                                                          None, None)
    assert train.data.dtype == torch.float32 and torch.isfinite(train.data).all()
    assert 0.3 < float(train.data.abs().max()) < 4.0
    assert torch.equal(train.data, load_dataset(f"toy:{toy}", "train").data)
    assert not torch.equal(train.data[:2000], test.data)
    state = torch.get_rng_state()
    load_dataset(f"toy:{toy}", "test")
    assert torch.equal(state, torch.get_rng_state())


def test_checkerboard_only_dark_squares():
    x = load_dataset("toy:checkerboard", "test").data
    cells = torch.floor(x + 2).long()
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()


# ---------------------------------------------------------------- describe


def test_describe_digits():
    info = describe("digits")
    assert set(info) == {"train", "test"}
    assert set(info["train"]) == {"n", "shape", "levels", "channel_mean"}
    assert info["train"]["n"] == 1437 and info["test"]["n"] == 360
    assert info["train"]["shape"] == [1, 8, 8] and info["test"]["levels"] == 17
    mean = load_dataset("digits", "train").data.double().mean().item()
    assert info["train"]["channel_mean"] == pytest.approx([mean])
    text = format_description("digits", info)
    assert "1437" in text and "17 levels" in text


def test_describe_cifar_fixture_and_toy(tmp_path):
    write_cifar(tmp_path)
    info = describe("cifar10", str(tmp_path))
    assert info["train"] == {"n": 10, "shape": [3, 32, 32], "levels": 256,
                             "channel_mean": pytest.approx([3.0, 100.5, 200.0])}
    red = 7 + (255 - 7) / (5 * 1024)
    assert info["test"]["channel_mean"] == pytest.approx([red, 8.0, 9.0])
    toy = describe("toy:8gaussians")
    assert toy["test"]["levels"] is None and toy["test"]["shape"] == [2]
    assert "continuous" in format_description("toy:8gaussians", toy)
