"""Lazy readers for PyTorch `.pth` (zip) and safetensors files, and a safetensors writer.

Nothing here imports torch. A `.pth` file is a zip archive: `data.pkl` pickles the structure
and each tensor's storage is a separate uncompressed member. Unpickling with stand-ins for
torch's rebuild functions gives each tensor's storage, offset, shape and strides; the bytes are
read only when a tensor is loaded, so converting a checkpoint never holds more than the tensors
being worked on. safetensors is a JSON header followed by raw little-endian tensors.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass

import ml_dtypes
import numpy as np

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


class FormatError(ValueError):
    """A file that is truncated, corrupt, or not in the expected format."""


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
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(self.nbytes)
        else:
            try:
                with zipfile.ZipFile(self.path) as z, z.open(self.member) as f:
                    f.seek(self.offset)
                    data = f.read(self.nbytes)
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise FormatError(f"{self.path}: cannot read {self.member}: {e}") from e
        if len(data) != self.nbytes:
            raise FormatError(
                f"{self.path} is truncated: tensor needs {self.nbytes} bytes, found {len(data)}"
            )
        return np.frombuffer(data, dtype=self.dtype).reshape(self.shape)


class _StorageRef:
    def __init__(self, dtype, key):
        self.dtype, self.key = dtype, key


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
            return dict
        if module == "torch" and name in ("float32", "bfloat16", "float16"):
            return name
        raise FormatError(f"{self.path}: unsupported object {module}.{name} in the pickle")

    def persistent_load(self, pid):
        # ("storage", storage_type, key, location, numel)
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise FormatError(f"{self.path}: unexpected persistent id {pid!r}")
        return _StorageRef(_TORCH_STORAGE_DTYPES[pid[1]], pid[2])

    def _rebuild_tensor(self, storage, offset, shape, stride, *args):
        shape, stride = tuple(shape), tuple(stride)
        expected = tuple(int(np.prod(shape[i + 1 :])) for i in range(len(shape)))
        if shape and stride != expected:
            raise FormatError(f"{self.path}: non-contiguous tensor (stride {stride})")
        dtype = np.dtype(storage.dtype)
        member = f"{self.prefix}/data/{storage.key}"
        return LazyTensor(self.path, member, offset * dtype.itemsize, shape, dtype)


def load_pth(path: str) -> dict[str, LazyTensor]:
    """The tensors of a `torch.save`d state dict, lazily."""
    try:
        with zipfile.ZipFile(path) as z:
            pickles = [n for n in z.namelist() if n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise FormatError(f"{path}: not a PyTorch zip checkpoint (no data.pkl)")
            prefix = pickles[0][: -len("/data.pkl")]
            with z.open(pickles[0]) as f:
                state = _TorchUnpickler(f, path, prefix).load()
            sizes = {i.filename: i.file_size for i in z.infolist()}
    except zipfile.BadZipFile as e:
        raise FormatError(f"{path} is truncated or not a PyTorch checkpoint: {e}") from e
    if not isinstance(state, dict):
        raise FormatError(f"{path}: expected a state dict, found {type(state).__name__}")
    for name, t in state.items():
        if isinstance(t, LazyTensor) and t.offset + t.nbytes > sizes.get(t.member, -1):
            raise FormatError(f"{path} is truncated: tensor {name!r} runs past its storage")
    return {k: v for k, v in state.items() if isinstance(v, LazyTensor)}


def load_safetensors(path: str) -> dict[str, LazyTensor]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"{path} is truncated: no safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise FormatError(f"{path} is truncated or not safetensors (header of {n} bytes)")
        header = json.loads(f.read(n))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise FormatError(f"{path}: unsupported dtype {info['dtype']} of {name!r}")
        start, end = info["data_offsets"]
        if 8 + n + end > size:
            raise FormatError(f"{path} is truncated: tensor {name!r} runs past the end")
        out[name] = LazyTensor(
            path,
            None,
            8 + n + start,
            tuple(info["shape"]),
            np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]),
        )
    return out


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
