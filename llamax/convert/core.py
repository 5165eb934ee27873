"""`convert`: read one format, write another, atomically, nothing unverified or non-finite.

Every conversion passes tensors one at a time in Hugging Face's names and layout (the common
currency of `meta`, `hf` and `native`): inputs are read lazily, tensor by tensor, and outputs
written as they come. The output goes to a temporary directory beside the output path that is
renamed to it only when complete, with a `manifest.json` (`llamax.convert.manifest`) that
records what it was converted from.

Inputs are verified before anything is written: a directory llamax wrote against its
`manifest.json`, Meta's release against its `checklist.chk` (md5 sums); a llamax checkpoint
by `pretrained` as it is read. Every tensor written is checked finite as it passes, after the
cast to the output dtype: a NaN or an infinite value of the input, or a value beyond the
output dtype's range, is refused with the tensor named.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterator

import numpy as np

from llamax import fs, lock, pretrained
from llamax.config import LlamaConfig
from llamax.convert import hf, manifest, meta, native, peft
from llamax.convert.formats import FormatError, require_finite
from llamax.execution import DTYPES

log = logging.getLogger("llamax")
FORMATS = ("meta", "hf", "llamax")
_READERS = {"meta": meta.read, "hf": hf.read, "llamax": native.read}
# The files of an input directory each reader reads: one the manifest does not list is
# refused only if it is one of these (other files beside, a README, are not read).
_READ_FILES = {
    "hf": r"config\.json|[^/]*\.safetensors|model\.safetensors\.index\.json|tokenizer\.model",
    "meta": r"params\.json|consolidated\.\d+\.pth|tokenizer\.model",
}


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


def verify_input(fmt: str, directory: str) -> str | None:
    """Checks an input directory against the checksums it carries, before anything is read
    from it: a `manifest.json` (llamax wrote it), else Meta's `checklist.chk`; refuses it
    (`FormatError`) naming what differs. Returns the file that verified it, None when it
    carries no checksums (or is a llamax checkpoint, which `pretrained` verifies as it reads
    it)."""
    if fmt not in _READ_FILES or not fs.isdir(directory):
        return None  # llamax checkpoints: verified as they are read; a missing input: named later
    if fs.exists(fs.join(directory, manifest.NAME)):
        pattern = re.compile(_READ_FILES[fmt])
        problems = manifest.verify(directory, lambda rel: pattern.fullmatch(rel) is not None)
        if problems:
            shown = "; ".join(problems[:3]) + (f"; {len(problems) - 3} more" if len(problems) > 3
                                               else "")  # fmt: skip
            raise FormatError(
                f"{directory} differs from the {manifest.NAME} llamax wrote with it: {shown}. "
                "Nothing was converted; convert an intact copy"
            )
        return manifest.NAME
    if fmt == "meta":
        names = [os.path.basename(p) for p in meta.shard_files(directory)] + ["params.json"]
        if meta.verify_checklist(directory, names):
            return meta.CHECKLIST
    return None


def _find_tokenizer(input_dir: str, explicit: str | None) -> str | None:
    if explicit:
        return fs.require_file(explicit, "--tokenizer ")
    for candidate in (input_dir, os.path.dirname(fs.absolute(input_dir))):
        path = fs.join(candidate, "tokenizer.model")
        if fs.isfile(path):
            return path
    return None


def _verify_tokenizer(path: str) -> None:
    """A tokenizer beside Meta's md5 sums of it (`tokenizer_checklist.chk`, or the
    `checklist.chk` of its directory) is checked against them."""
    directory, name = os.path.dirname(fs.absolute(path)), os.path.basename(path)
    for checklist in (meta.TOKENIZER_CHECKLIST, meta.CHECKLIST):
        if meta.verify_checklist(directory, [name], checklist, listed_only=True):
            return


def _cast(name: str, load: Callable[[], np.ndarray], dtype: str, where: str) -> np.ndarray:
    """Tensor `name` of the input `where` in `dtype`, refused (`FormatError` naming it) when a
    value of it is NaN or infinite, in the input or from a value beyond `dtype`'s range."""
    value = load()
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.asarray(value, dtype=dtype)
    if np.isfinite(out).all():
        return out
    require_finite(name, value, where)
    largest = float(np.abs(np.asarray(value, np.float64)).max())
    over = int(np.count_nonzero(~np.isfinite(out)))
    advice = "; convert with --dtype float32" if largest <= np.finfo(np.float32).max else ""
    raise FormatError(
        f"{where}: {name} does not fit {dtype}: {over:,} of {out.size:,} values (up to "
        f"{largest:.4g}) are beyond its range (+-{float(np.finfo(out.dtype).max):.4g}) and "
        f"would be infinite{advice}"
    )


def _refuse_existing(output_dir: str) -> None:
    if fs.exists(output_dir):
        raise FileExistsError(f"Output {output_dir} exists; remove it or choose another path")


@contextlib.contextmanager
def _output(output_dir: str) -> Iterator[str]:
    """The one place a conversion's output is created: a new local directory that becomes
    `output_dir` when the block ends without an error and is removed when it raises. An
    existing output is never overwritten."""
    _refuse_existing(output_dir)
    with fs.atomic_path(output_dir) as tmp:
        os.makedirs(tmp)
        yield tmp


def _peft_export(input_dir: str, output_dir: str, base_name: str | None) -> LlamaConfig:
    """`--to peft`: a LoRA run's adapters, with what PEFT loads the base by."""
    run = pretrained.lora_run(input_dir)
    if run is None:
        raise ValueError(f"{input_dir} is not the workdir of a LoRA run (lora.rank > 0)")
    base_model = peft.base_model_name(run[1], base_name)
    adapters, lora, _ = pretrained.run_adapters(input_dir)
    with _output(output_dir) as tmp:
        peft.write_adapters(adapters, lora, tmp, base_model)
    log.info("wrote the adapters of %s (%s) to %s, on the base %s", input_dir, lora, output_dir,
             base_model)  # fmt: skip
    return pretrained.read_model_config(input_dir)


def convert(
    src: str,
    dst: str,
    input_dir: str,
    output_dir: str,
    shards: int = 1,
    dtype: str | None = None,
    tokenizer: str | None = None,
    base: str | None = None,
    base_name: str | None = None,
) -> LlamaConfig:
    """Converts `input_dir` (format `src`) to `output_dir` (format `dst`) with parameters in
    `dtype` (default: the input's, or float32 when it is not a float type), atomically, after
    verifying the input (`verify_input`) and refusing any tensor that is not finite.
    `--from peft` merges PEFT adapters into the llamax checkpoint `base`; `--to peft` writes
    a LoRA run's adapters alone, for PEFT to load on `base_name` (`peft.base_model_name`).
    One conversion writes an output at a time: a second one into the same `output_dir` is
    refused at once (`lock.Held`, naming the first)."""
    with lock.output(output_dir):
        return _convert(src, dst, input_dir, output_dir, shards, dtype, tokenizer, base,
                        base_name)  # fmt: skip


def _convert(src, dst, input_dir, output_dir, shards, dtype, tokenizer, base, base_name):
    if base_name is not None and dst != "peft":
        raise ValueError("--base-name names the base of adapters written --to peft")
    if dst == "peft":
        if src != "llamax":
            raise ValueError("--to peft writes the adapters of a llamax LoRA run: --from llamax")
        _refuse_existing(output_dir)
        return _peft_export(input_dir, output_dir, base_name)
    if dst not in FORMATS or src not in (*FORMATS, "peft"):
        raise ValueError(f"Formats must be among {FORMATS} (and peft); got --from {src} --to {dst}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    _refuse_existing(output_dir)
    start = time.perf_counter()
    verified = verify_input(src, input_dir)
    config, tensors = read(src, input_dir, base)
    source_dtype = tensors["model.norm.weight"]().dtype.name
    dtype = dtype or (source_dtype if source_dtype in DTYPES else "float32")
    where = base if src == "peft" else input_dir
    tensors = {k: (lambda k=k, f=f: _cast(k, f, dtype, where)) for k, f in tensors.items()}
    tokenizer_path = _find_tokenizer(input_dir, tokenizer)
    if tokenizer_path:
        from llamax.data.tokenizer import Tokenizer

        if src == "meta":
            _verify_tokenizer(tokenizer_path)
        vocab = Tokenizer(tokenizer_path).vocab_size
        if vocab != config.vocab_size:
            raise FormatError(
                f"{tokenizer_path} has {vocab} pieces but the weights have a "
                f"{config.vocab_size}-row embedding"
            )
    source = {"format": src, "path": fs.absolute(input_dir)}
    if src == "peft":
        source["base"] = fs.absolute(base)

    with _output(output_dir) as tmp:
        if dst == "llamax":
            native.write(config, tensors, tmp, dtype)
        elif dst == "hf":
            hf.write(config, tensors, tmp, dtype)
        else:
            meta.write(config, tensors, tmp, shards)
        if tokenizer_path:
            fs.copy_file(tokenizer_path, os.path.join(tmp, "tokenizer.model"))
        manifest.write(tmp, config, dst, dtype, source)
    log.info(
        "converted %s (%s) to %s (%s): %s parameters, %s, in %.1fs",
        input_dir, src, output_dir, dst, f"{config.num_params():,}", dtype,
        time.perf_counter() - start,
    )  # fmt: skip
    if verified:
        log.info("its input was verified against its %s", verified)
    elif src in _READ_FILES:
        carried = "manifest.json" + (f" or {meta.CHECKLIST}" if src == "meta" else "")
        log.warning("its input %s carries no checksums (no %s): it could not be verified",
                    input_dir, carried)  # fmt: skip
    return config
