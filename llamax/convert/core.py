"""`convert`: read one format, write another, atomically.

Every conversion passes tensors one at a time in Hugging Face's names and layout (the common
currency of `meta`, `hf` and `native`): inputs are read lazily, tensor by tensor, and outputs
written as they come. The output goes to a temporary directory beside the output path that is
renamed to it only when complete, with a `manifest.json` (`llamax.convert.manifest`).
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from llamax import fs, pretrained
from llamax.config import LlamaConfig
from llamax.convert import hf, manifest, meta, native, peft
from llamax.convert.formats import FormatError
from llamax.execution import DTYPES

log = logging.getLogger("llamax")
FORMATS = ("meta", "hf", "llamax")
_READERS = {"meta": meta.read, "hf": hf.read, "llamax": native.read}


def read(fmt: str, directory: str, base: str | None = None) -> tuple[LlamaConfig, native.Tensors]:
    """The config and lazy tensors (Hugging Face names) of a checkpoint in format `fmt`; for
    `peft`, the llamax checkpoint `base` with the adapters in `directory` merged in."""
    if fmt == "peft":
        if not base:
            raise ValueError("--from peft needs --base: the llamax checkpoint the adapters fit")
        config, tensors = native.read(base)
        adapters, lora = peft.import_adapters(directory, config)
        return peft.merged_tensors(config, tensors, adapters, lora)
    if fmt not in _READERS:
        raise ValueError(f"Unknown format {fmt!r}; expected one of {(*FORMATS, 'peft')}")
    return _READERS[fmt](directory)


def _find_tokenizer(input_dir: str, explicit: str | None) -> str | None:
    if explicit:
        if not fs.isfile(explicit):
            raise FileNotFoundError(f"Tokenizer not found: {explicit}")
        return explicit
    for candidate in (input_dir, os.path.dirname(fs.absolute(input_dir))):
        path = fs.join(candidate, "tokenizer.model")
        if fs.isfile(path):
            return path
    return None


def convert(
    src: str,
    dst: str,
    input_dir: str,
    output_dir: str,
    shards: int = 1,
    dtype: str | None = None,
    tokenizer: str | None = None,
    base: str | None = None,
) -> LlamaConfig:
    """Converts `input_dir` (format `src`) to `output_dir` (format `dst`) with parameters in
    `dtype` (default: the input's, or float32 when it is not a float type), atomically.
    `--from peft` merges PEFT adapters into the llamax checkpoint `base`; `--to peft` writes
    a LoRA run's adapters alone."""
    if dst == "peft":
        if src != "llamax":
            raise ValueError("--to peft writes the adapters of a llamax LoRA run: --from llamax")
        if fs.exists(output_dir):
            raise FileExistsError(f"Output {output_dir} exists; remove it or choose another path")
        adapters, lora, base_path = pretrained.run_adapters(input_dir)
        peft.export_adapters(adapters, lora, output_dir, base_model=base_path)
        log.info("wrote the adapters of %s (%s) to %s", input_dir, lora, output_dir)
        return pretrained.read_model_config(input_dir)
    if dst not in FORMATS or src not in (*FORMATS, "peft"):
        raise ValueError(f"Formats must be among {FORMATS} (and peft); got --from {src} --to {dst}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if fs.exists(output_dir):
        raise FileExistsError(f"Output {output_dir} exists; remove it or choose another path")
    start = time.perf_counter()
    config, tensors = read(src, input_dir, base)
    source_dtype = tensors["model.norm.weight"]().dtype.name
    dtype = dtype or (source_dtype if source_dtype in DTYPES else "float32")
    tensors = {k: (lambda f=f: np.asarray(f(), dtype=dtype)) for k, f in tensors.items()}
    tokenizer_path = _find_tokenizer(input_dir, tokenizer)
    if tokenizer_path:
        from llamax.data.tokenizer import Tokenizer

        vocab = Tokenizer(tokenizer_path).vocab_size
        if vocab != config.vocab_size:
            raise FormatError(
                f"{tokenizer_path} has {vocab} pieces but the weights have a "
                f"{config.vocab_size}-row embedding"
            )

    with fs.atomic_path(output_dir) as tmp:
        os.makedirs(tmp)
        if dst == "llamax":
            native.write(config, tensors, tmp, dtype)
        elif dst == "hf":
            hf.write(config, tensors, tmp, dtype)
        else:
            meta.write(config, tensors, tmp, shards)
        if tokenizer_path:
            fs.copy_file(tokenizer_path, os.path.join(tmp, "tokenizer.model"))
        manifest.write(tmp, config, dst, dtype)
    log.info(
        "converted %s (%s) to %s (%s): %s parameters, %s, in %.1fs",
        input_dir, src, output_dir, dst, f"{config.num_params():,}", dtype,
        time.perf_counter() - start,
    )  # fmt: skip
    return config
