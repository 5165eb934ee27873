"""Lazy readers for PyTorch `.pth` (zip) and safetensors files, and a safetensors writer.

Nothing here imports torch. A `.pth` file is a zip archive: `data.pkl` pickles the structure
and each tensor's storage is a separate uncompressed member. Unpickling with stand-ins for
torch's rebuild functions gives each tensor's storage, offset, shape and strides; the bytes are
read only when a tensor is loaded, so converting a checkpoint never holds more than the tensors
being worked on. safetensors is a JSON header followed by raw little-endian tensors.

Both are read as untrusted input. The unpickler builds only the few objects a state dict
needs (no code runs), refuses a `data.pkl` over `MAX_PICKLE_BYTES` before reading it, and
refuses any attempt to set the state of its stand-ins (pickle's BUILD), which could otherwise
point a tensor at another file. A safetensors header is checked as the reference `safetensors`
library checks it: its size, a JSON object, known dtypes, shapes of non-negative integers, and
byte ranges that tile the data exactly (no gap, overlap, alias or range past the end) and
match shape x dtype. Every problem is a `FormatError` that names the file; `require_finite`
refuses a tensor that holds a NaN or an infinite value, naming it.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
import zipfile
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from llamax import fs

_TORCH_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "DoubleStorage": np.float64,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_SAFETENSORS_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
}
_SAFETENSORS_NAMES = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
# A state dict's pickle holds names, shapes and storage keys: kilobytes to a few megabytes.
MAX_PICKLE_BYTES = 64 << 20
# The reference safetensors library refuses headers over 100 MB.
MAX_SAFETENSORS_HEADER = 100_000_000


class FormatError(ValueError):
    """A file that is truncated, corrupt, or not in the expected format."""


def require_finite(name: str, array: np.ndarray, where: str = "") -> np.ndarray:
    """`array` when every value of it is finite; otherwise a `FormatError` naming the tensor
    (`where`: the file or what it is part of) and how many of its values are NaN or infinite,
    so that no NaN or inf passes into a model's weights."""
    if np.isfinite(array).all():
        return array
    values = np.asarray(array, np.float32) if array.dtype.kind not in "fc" else array
    nan = int(np.count_nonzero(np.isnan(values)))
    inf = int(np.count_nonzero(np.isinf(values)))
    found = " and ".join(f"{kind} ({n:,} of {array.size:,} values)"
                         for kind, n in (("NaN", nan), ("inf", inf)) if n)  # fmt: skip
    raise FormatError(f"{where}{': ' if where else ''}{name} has {found}")


@dataclass
class LazyTensor:
    """A tensor in a file, read on `load()`."""

    path: str
    member: str | None  # zip member of the storage (.pth), None for safetensors
    offset: int  # in bytes
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def load(self) -> np.ndarray:
        if self.member is None:
            with fs.open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(self.nbytes)
        else:
            try:
                with (
                    fs.open(self.path, "rb") as raw,
                    zipfile.ZipFile(raw) as z,
                    z.open(self.member) as f,
                ):
                    f.seek(self.offset)
                    data = f.read(self.nbytes)
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise FormatError(f"{self.path}: cannot read {self.member}: {e}") from e
        if len(data) != self.nbytes:
            raise FormatError(
                f"{self.path} is truncated: tensor needs {self.nbytes} bytes, found {len(data)}"
            )
        return np.frombuffer(data, dtype=self.dtype).reshape(self.shape)

    def __setstate__(self, state):
        raise FormatError(f"{self.path}: the pickle tries to set the state of a tensor")


class _StorageRef:
    def __init__(self, dtype, key, numel):
        self.dtype, self.key, self.numel = dtype, key, numel

    def __setstate__(self, state):
        raise FormatError("the pickle tries to set the state of a tensor storage")


class _OrderedDict(dict):
    """`collections.OrderedDict` as a state dict pickles it: PyTorch's carries a `_metadata`
    attribute (module versions), set by BUILD and of no use here."""

    def __setstate__(self, state):
        pass


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _TorchUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str, prefix: str):
        super().__init__(file)
        self.path, self.prefix = path, prefix

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor
        if module == "torch" and name in _TORCH_STORAGE_DTYPES:
            return name
        if module == "collections" and name == "OrderedDict":
            return _OrderedDict
        if module == "torch" and name in ("float32", "bfloat16", "float16"):
            return name
        raise FormatError(f"{self.path}: unsupported object {module}.{name} in the pickle")

    def persistent_load(self, pid):
        # ("storage", storage_type, key, location, numel)
        if not (
            isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and pid[1] in _TORCH_STORAGE_DTYPES and isinstance(pid[2], str)
            and _is_int(pid[4]) and pid[4] >= 0
        ):  # fmt: skip
            raise FormatError(f"{self.path}: unexpected persistent id {str(pid)[:200]}")
        return _StorageRef(_TORCH_STORAGE_DTYPES[pid[1]], pid[2], pid[4])

    def _rebuild_tensor(self, storage, offset, shape, stride, *args):
        if not (
            isinstance(storage, _StorageRef) and _is_int(offset) and offset >= 0
            and isinstance(shape, tuple | list) and all(_is_int(n) and n >= 0 for n in shape)
            and isinstance(stride, tuple | list) and all(_is_int(n) for n in stride)
        ):  # fmt: skip
            raise FormatError(f"{self.path}: malformed tensor in the pickle")
        shape, stride = tuple(shape), tuple(stride)
        expected = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
        if shape and stride != expected:
            raise FormatError(f"{self.path}: non-contiguous tensor (stride {stride})")
        if offset + math.prod(shape) > storage.numel:
            raise FormatError(f"{self.path}: a tensor runs past the end of its storage")
        dtype = np.dtype(storage.dtype)
        member = f"{self.prefix}/data/{storage.key}"
        return LazyTensor(self.path, member, offset * dtype.itemsize, shape, dtype)


def load_pth(path: str) -> dict[str, LazyTensor]:
    """The tensors of a `torch.save`d state dict, lazily."""
    try:
        with fs.open(path, "rb") as raw, zipfile.ZipFile(raw) as z:
            pickles = [i for i in z.infolist() if i.filename.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise FormatError(f"{path}: not a PyTorch zip checkpoint (no data.pkl)")
            if pickles[0].file_size > MAX_PICKLE_BYTES:
                raise FormatError(
                    f"{path}: its data.pkl is {pickles[0].file_size:,} bytes, more than a state "
                    f"dict needs (limit {MAX_PICKLE_BYTES:,}): refusing to unpickle it"
                )
            prefix = pickles[0].filename[: -len("/data.pkl")]
            with z.open(pickles[0]) as f:
                state = _TorchUnpickler(f, path, prefix).load()
            sizes = {i.filename: i.file_size for i in z.infolist()}
    except FormatError:
        raise
    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as e:
        raise FormatError(f"{path} is truncated or not a PyTorch checkpoint: {e}") from e
    except (pickle.UnpicklingError, OSError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, RecursionError, MemoryError) as e:  # fmt: skip
        raise FormatError(f"{path}: its pickle is malformed ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise FormatError(f"{path}: expected a state dict, found {type(state).__name__}")
    for name, t in state.items():
        if not isinstance(name, str):
            raise FormatError(f"{path}: a state dict key is not a string: {str(name)[:100]}")
        if isinstance(t, LazyTensor) and t.offset + t.nbytes > sizes.get(t.member, -1):
            raise FormatError(f"{path} is truncated: tensor {name!r} runs past its storage")
    return {k: v for k, v in state.items() if isinstance(v, LazyTensor)}


def load_safetensors(path: str) -> dict[str, LazyTensor]:
    """The tensors of a safetensors file, lazily, after checking its header as the reference
    library does."""
    size = fs.getsize(path)
    with fs.open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"{path} is truncated: no safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_SAFETENSORS_HEADER:
            raise FormatError(f"{path}: a safetensors header of {n:,} bytes is too large")
        if n > size - 8:
            raise FormatError(f"{path} is truncated or not safetensors (header of {n} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"{path}: the safetensors header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise FormatError(f"{path}: the safetensors header is not a JSON object")
    out, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict):
                raise FormatError(f"{path}: __metadata__ is not a JSON object")
            continue
        dtype, shape, start, end = _tensor_entry(path, name, info)
        spans.append((start, end, name))
        out[name] = LazyTensor(path, None, 8 + n + start, shape, dtype)
    # The byte ranges must tile the data exactly, in order: no gap, overlap or alias.
    position = 0
    for start, end, name in sorted(spans):
        if start != position:
            raise FormatError(
                f"{path}: tensor {name!r} starts at byte {start} of the data, expected "
                f"{position} (byte ranges must not overlap, alias or leave gaps)"
            )
        position = end
    if position != size - 8 - n:
        raise FormatError(
            f"{path}: the tensors cover {position} bytes of data but the file holds "
            f"{size - 8 - n} (truncated, or bytes no tensor owns)"
        )
    return out


def _tensor_entry(path: str, name: str, info: Any) -> tuple[np.dtype, tuple, int, int]:
    """(dtype, shape, start, end) of one header entry, each checked."""
    where = f"{path}: tensor {str(name)[:100]!r}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise FormatError(f"{where} needs dtype, shape and data_offsets")
    if info["dtype"] not in _SAFETENSORS_DTYPES:
        raise FormatError(f"{where}: unsupported dtype {str(info['dtype'])[:20]}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
        raise FormatError(f"{where}: shape must be a list of non-negative integers")
    if not (
        isinstance(offsets, list) and len(offsets) == 2
        and all(_is_int(o) and o >= 0 for o in offsets) and offsets[0] <= offsets[1]
    ):  # fmt: skip
        raise FormatError(f"{where}: data_offsets must be [start, end] with 0 <= start <= end")
    dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
    start, end = offsets
    if end - start != math.prod(shape) * dtype.itemsize:
        raise FormatError(
            f"{where}: data_offsets span {end - start} bytes, but shape {shape} of "
            f"{info['dtype']} needs {math.prod(shape) * dtype.itemsize}"
        )
    return dtype, tuple(shape), start, end


class SafetensorsWriter:
    """Writes tensors one at a time: the header is laid out first from their shapes."""

    def __init__(self, path: str, shapes: dict[str, tuple[tuple[int, ...], np.dtype]]):
        header, offset = {}, 0
        for name, (shape, dtype) in shapes.items():
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
            header[name] = {
                "dtype": _SAFETENSORS_NAMES[np.dtype(dtype)],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.order, self.expected, self.written = list(shapes), shapes, 0
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, array: np.ndarray) -> None:
        if name != self.order[self.written]:
            raise ValueError(f"tensors must be written in header order: got {name!r}")
        shape, dtype = self.expected[name]
        array = np.ascontiguousarray(array, dtype=dtype)
        if array.shape != tuple(shape):
            raise ValueError(f"{name}: shape {array.shape}, header says {shape}")
        self.file.write(array.tobytes())
        self.written += 1

    def close(self) -> None:
        self.file.close()
        if self.written != len(self.order):
            raise ValueError(f"only {self.written} of {len(self.order)} tensors were written")
