"""Untrusted or malformed input to the converter, the tokenizer and `--verify`: each gives one
`error:` line naming the file and the problem, exit code 2, bounded memory, and no partial
output; and a conversion stopped by a signal leaves nothing behind."""

import collections
import json
import math
import os
import pickle
import shutil
import signal
import struct
import time
import tracemalloc
import zipfile

import numpy as np
import pytest
import safetensors
import torch
from conftest import hf_model, run_cli
from test_convert import CONFIGS, write_meta_checkpoint

import llamax
from llamax import convert, fs
from llamax.cli import convert as convert_cli
from llamax.convert import formats, hf
from llamax.data.tokenizer import Tokenizer


def _refused(capsys, tmp_path, args, *names):
    """The CLI exits 2 with one error line naming `names`, and writes nothing."""
    out = tmp_path / "out"
    capsys.readouterr()  # what the test printed making its files
    code = convert_cli.main([*args, "--output", str(out)] if "--verify" not in args else args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("llamax-convert: error:"), err
    for name in names:
        assert name in err[0], (name, err[0])
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out")]
    return err[0]


@pytest.fixture
def meta_dir(tmp_path):
    config = CONFIGS[1]
    write_meta_checkpoint(hf_model(config), config, str(tmp_path / "meta"), 1)
    return tmp_path / "meta"


def _meta_args(directory):
    return ["--from", "meta", "--to", "llamax", "--input", str(directory)]


# ----- params.json -----


@pytest.mark.parametrize(
    "change, problem",
    [({"n_layers": 1_000_000_000}, "the config says 1000000000 layers"),
     ({"norm_eps": float("nan")}, "norm_eps must be a finite positive number"),
     ({"norm_eps": -1}, "norm_eps must be a finite positive number"),
     ({"rope_theta": float("inf")}, "rope_theta must be a finite positive number"),
     ({"rope_theta": -5}, "rope_theta must be a finite positive number"),
     ({"vocab_size": "x"}, "vocab_size must be an integer"),
     ({"dim": 2**40}, "params.json"),
     ([1, 2], "must be a JSON object")],
)  # fmt: skip
def test_bad_params_json(meta_dir, tmp_path, capsys, change, problem):
    path = meta_dir / "params.json"
    params = json.loads(path.read_text())
    path.write_text(json.dumps(change if isinstance(change, list) else {**params, **change}))
    tracemalloc.start()
    line = _refused(capsys, tmp_path, _meta_args(meta_dir), problem)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "consolidated.00.pth" in line or "params.json" in line
    assert peak < 64 << 20, peak  # a billion layers' names are never made


# ----- pickles -----


def _torch_zip(path, data_pkl: bytes, storages=(), compress=False):
    """A `.pth` zip as torch writes one, with a given `data.pkl`."""
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=method) as z:
        z.writestr("archive/data.pkl", data_pkl)
        for key, raw in storages:
            z.writestr(f"archive/data/{key}", raw)
        z.writestr("archive/version", "3\n")


class _Storage:
    pass


class _Pickler(pickle.Pickler):
    """Pickles torch's rebuild call by hand: a stand-in storage, then any state on the
    rebuilt tensor (what a BUILD opcode would set)."""

    def persistent_id(self, obj):
        return ("storage", "FloatStorage", "0", "cpu", 4) if isinstance(obj, _Storage) else None


class _Tensor:
    def __init__(self, state=None):
        self.state = state

    def __reduce__(self):
        args = (_Storage(), 0, (4,), (1,), False, collections.OrderedDict())
        return (torch._utils._rebuild_tensor_v2, args, self.state)


def _pickled(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def test_a_pickle_that_redirects_a_tensor_is_refused(tmp_path):
    other = tmp_path / "other.pth"
    torch.save({"x": torch.ones(4)}, other)
    evil = {"w": _Tensor({"path": str(other), "member": "archive/data/0"})}
    path = tmp_path / "evil.pth"
    _torch_zip(path, _pickled(evil), [("0", np.zeros(4, np.float32).tobytes())])
    with pytest.raises(formats.FormatError, match="evil.pth: .*set the state of a tensor"):
        formats.load_pth(str(path))
    plain = tmp_path / "plain.pth"  # the same without the state: accepted
    _torch_zip(plain, _pickled({"w": _Tensor()}), [("0", np.ones(4, np.float32).tobytes())])
    np.testing.assert_array_equal(formats.load_pth(str(plain))["w"].load(), np.ones(4))


def test_a_pickle_that_calls_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    path = tmp_path / "code.pth"
    _torch_zip(path, pickle.dumps({"w": Evil()}, protocol=2))
    with pytest.raises(formats.FormatError, match="code.pth: unsupported object posix.system"):
        formats.load_pth(str(path))


def test_a_huge_pickle_is_refused_before_it_is_read(tmp_path):
    """A 1.5 MB file holding a 200 MB (compressed) string: refused by its size, unread."""
    path = tmp_path / "bomb.pth"
    n = 200 << 20
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open("archive/data.pkl", "w", force_zip64=True) as f:
            f.write(b"\x80\x02\x8e" + struct.pack("<Q", n))  # PROTO 2, BINBYTES8 of n bytes
            zeros = bytes(1 << 20)
            for _ in range(n >> 20):
                f.write(zeros)
            f.write(b".")
    assert os.path.getsize(path) < 2 << 20
    tracemalloc.start()
    with pytest.raises(formats.FormatError, match=r"bomb.pth: its data.pkl is 209,715,"):
        formats.load_pth(str(path))
    assert tracemalloc.get_traced_memory()[1] < 16 << 20
    tracemalloc.stop()


@pytest.mark.parametrize(
    "pkl, problem",
    [(pickle.dumps([1, 2]), "expected a state dict"),
     (pickle.dumps({1: 2}), "key is not a string"),
     (b"\x80\x02garbage", "pickle is malformed"),
     (b"", "truncated")],
)  # fmt: skip
def test_malformed_pickles(tmp_path, pkl, problem):
    path = tmp_path / "bad.pth"
    _torch_zip(path, pkl)
    with pytest.raises(formats.FormatError, match=f"bad.pth.*{problem}"):
        formats.load_pth(str(path))


# ----- safetensors: refused exactly where the reference library refuses -----


def _safetensors(path, header, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _entry(offsets, shape=(2,), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BAD_HEADERS = {
    "aliased": ({"a": _entry((0, 8)), "b": _entry((0, 8))}, 16),
    "overlapping": ({"a": _entry((0, 8)), "b": _entry((4, 12))}, 12),
    "a gap": ({"a": _entry((0, 8)), "b": _entry((12, 20))}, 20),
    "start after end": ({"a": _entry((8, 0))}, 8),
    "span not shape x dtype": ({"a": _entry((0, 12))}, 12),
    "negative start": ({"a": _entry((-4, 4))}, 8),
    "past the end": ({"a": _entry((0, 8))}, 4),
    "bytes no tensor owns": ({"a": _entry((0, 8))}, 12),
    "missing dtype": ({"a": {"shape": [2], "data_offsets": [0, 8]}}, 8),
    "unknown dtype": ({"a": _entry((0, 8), dtype="Q7")}, 8),
    "negative shape": ({"a": _entry((0, 8), shape=(-2,))}, 8),
    "a list": ([_entry((0, 8))], 8),
    "metadata not strings": ({"__metadata__": 5, "a": _entry((0, 8))}, 8),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_malformed_safetensors_are_refused_as_the_reference_refuses_them(tmp_path, case):
    header, data_bytes = BAD_HEADERS[case]
    path = tmp_path / "model.safetensors"
    _safetensors(path, header, bytes(data_bytes))
    with pytest.raises(Exception):  # noqa: B017 - the reference's own error types
        with safetensors.safe_open(str(path), "np") as f:
            [f.get_tensor(k) for k in f.keys()]
    with pytest.raises(formats.FormatError, match="model.safetensors"):
        formats.load_safetensors(str(path))


def test_a_huge_header_length_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(formats.FormatError, match="model.safetensors: .*too large"):
        formats.load_safetensors(str(path))


def test_a_valid_file_loads_as_the_reference_loads_it(tmp_path):
    path = tmp_path / "model.safetensors"
    a, b = np.arange(2, dtype=np.float32), np.arange(6, dtype=np.float16).reshape(2, 3)
    header = {"__metadata__": {"format": "pt"}, "b": _entry((8, 20), (2, 3), "F16"),
              "a": _entry((0, 8))}  # fmt: skip
    _safetensors(path, header, a.tobytes() + b.tobytes())
    ours = formats.load_safetensors(str(path))
    with safetensors.safe_open(str(path), "np") as f:
        for name in ("a", "b"):
            np.testing.assert_array_equal(ours[name].load(), f.get_tensor(name))


@pytest.mark.parametrize("shard", ["/etc/passwd", "../outside.safetensors", "sub/x.safetensors"])
def test_index_entries_outside_the_directory_are_refused(tmp_path, capsys, shard):
    model = hf_model(CONFIGS[1])
    model.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    index_path = tmp_path / "hf" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    index_path.write_text(json.dumps(index))
    args = ["--from", "hf", "--to", "llamax", "--input", str(tmp_path / "hf")]
    _refused(capsys, tmp_path, args, "model.safetensors.index.json", "not a file name inside")


def test_a_bad_hf_config_is_refused(tmp_path, capsys):
    hf_model(CONFIGS[1]).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text("[1, 2]")
    args = ["--from", "hf", "--to", "llamax", "--input", str(tmp_path / "hf")]
    _refused(capsys, tmp_path, args, "config.json", "must be a JSON object")


# ----- tokenizer.model and manifest.json -----


@pytest.mark.parametrize("content", ["garbage", "empty", "truncated"])
def test_a_bad_tokenizer_is_refused(tmp_path, capsys, meta_dir, tokenizer_path, content):
    path = tmp_path / "tokenizer.model"
    real = open(tokenizer_path, "rb").read()
    path.write_bytes({"garbage": b"\x00not a model" * 100, "empty": b"",
                      "truncated": real[: len(real) // 2]}[content])  # fmt: skip
    with pytest.raises(ValueError, match="tokenizer.model: not a sentencepiece model"):
        Tokenizer(str(path))
    args = [*_meta_args(meta_dir), "--tokenizer", str(path)]
    _refused(capsys, tmp_path, args, "tokenizer.model", "not a sentencepiece model")


@pytest.mark.parametrize(
    "manifest, problem",
    [('{"files": 5}', "malformed"), ("not json", "not JSON"), ("[]", "malformed"),
     ('{"files": {"../../etc/passwd": {"bytes": 1, "sha256": "x"}}}', "not inside"),
     ('{"files": {"a": {"bytes": "1"}}}', "needs bytes and sha256")],
)  # fmt: skip
def test_a_malformed_manifest_is_an_error(tmp_path, capsys, manifest, problem):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "manifest.json").write_text(manifest)
    _refused(capsys, tmp_path, ["--verify", str(tmp_path / "ck")], "manifest.json", problem)


# ----- a conversion stopped by a signal -----


@pytest.fixture(scope="module")
def big_hf(tmp_path_factory):
    """A 230 MB Hugging Face checkpoint (zeros; converting it takes a few seconds)."""
    directory = tmp_path_factory.mktemp("big") / "hf"
    directory.mkdir()
    config = llamax.LlamaConfig(dim=512, n_layers=8, n_heads=8, vocab_size=32000)
    shapes = hf.expected_hf_shapes(config)
    tensors = {
        name: (lambda shape=shape: np.zeros(shape, np.float32)) for name, shape in shapes.items()
    }
    hf.write(config, tensors, str(directory), "float32")
    return directory


def _start_conversion(src, out):
    return run_cli("convert", "--from", "hf", "--to", "llamax", "--input", str(src),
                   "--output", str(out), background=True)  # fmt: skip


def _temporaries(out):
    return [p for p in os.listdir(out.parent) if p.startswith(out.name + ".tmp-")]


def _stopped_mid_write(proc, out, timeout=120):
    """Waits for the conversion's temporary output, then freezes the process there (SIGSTOP):
    whatever the machine's speed, the caller's signal lands mid-conversion, which this
    checks (no output yet, a temporary without its manifest, which is written last)."""
    deadline = time.time() + timeout
    while not _temporaries(out):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.005)
    time.sleep(0.2)  # into the writes of the tensors
    proc.send_signal(signal.SIGSTOP)
    (tmp,) = _temporaries(out)
    assert not out.exists() and not (out.parent / tmp / "manifest.json").exists()
    return tmp


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_conversion_leaves_nothing(big_hf, tmp_path, sig):
    out = tmp_path / "out"
    proc = _start_conversion(big_hf, out)
    _stopped_mid_write(proc, out)
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    out_text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and "interrupted" in out_text, out_text[-2000:]
    assert not out.exists()
    time.sleep(1)  # no writer thread outlives the process's clean-up
    assert not _temporaries(out)


@pytest.mark.slow
def test_a_killed_conversions_leftover_is_removed_by_the_next(big_hf, tmp_path):
    out = tmp_path / "out"
    proc = _start_conversion(big_hf, out)
    stale = _stopped_mid_write(proc, out)
    proc.kill()
    proc.wait()
    assert _temporaries(out) == [stale]
    # A leftover in llamax 0.1's naming that carries this process's PID (containers reuse
    # PIDs) does not block either.
    os.makedirs(tmp_path / f"out.tmp-{os.getpid()}")
    convert.convert("hf", "llamax", str(big_hf), str(out))
    assert convert.verify(str(out)) == [] and not _temporaries(out)
    assert not (tmp_path / stale).exists()


def test_a_live_writers_temporary_is_left_alone(tmp_path):
    target = tmp_path / "file.json"
    live = tmp_path / f"file.json.tmp-{fs._HOST}-{os.getppid()}-0123abcd"
    other_host = tmp_path / f"file.json.tmp-elsewhere-{2**22 + 1}-0123abcd"
    for path in (live, other_host):
        path.write_text("being written")
    fs.write_json(str(target), {"a": 1})
    assert live.exists() and other_host.exists() and json.loads(target.read_text()) == {"a": 1}
    dead = tmp_path / f"file.json.tmp-{fs._HOST}-{2**22 + 1}-0123abcd"  # no such PID
    dead.write_text("left by a killed writer")
    fs.write_json(str(target), {"a": 2})
    assert not dead.exists()


def test_the_reference_and_ours_agree_on_real_files(tmp_path):
    """What transformers writes loads the same through both readers."""
    hf_model(CONFIGS[1]).save_pretrained(tmp_path / "hf")
    path = str(tmp_path / "hf" / "model.safetensors")
    ours = formats.load_safetensors(path)
    with safetensors.safe_open(path, "np") as f:
        assert sorted(f.keys()) == sorted(ours)
        for name in f.keys():
            np.testing.assert_array_equal(ours[name].load(), f.get_tensor(name))
    assert math.prod(ours["model.norm.weight"].shape) == CONFIGS[1].dim
    shutil.rmtree(tmp_path / "hf")


def test_a_failed_write_names_its_target_not_the_temporary(tmp_path):
    """A full disk's "[Errno 28] No space left on device" named nothing, and a read-only
    file system's error named the temporary written first: the error names the file the user
    asked for (or the file under the directory being written), and nothing is left."""
    import errno

    target = tmp_path / "out.json"
    with pytest.raises(OSError) as e, fs.atomic_path(str(target)):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert str(e.value) == f"cannot write {target}: No space left on device"
    assert e.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as e, fs.atomic_path(str(tmp_path / "out")) as tmp:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(tmp, "config.json"))
    assert str(e.value) == f"cannot write {tmp_path / 'out' / 'config.json'}: Read-only file system"
    with pytest.raises(FileNotFoundError, match="no-such-source"):  # another file's error
        fs.copy_file(str(tmp_path / "no-such-source"), str(target))
    assert not os.listdir(tmp_path)
