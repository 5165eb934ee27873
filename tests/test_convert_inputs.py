"""What a conversion reads is verified and finite: a NaN or inf tensor, or one that overflows
the output dtype, is refused by its Hugging Face name; a directory llamax wrote is checked
against its manifest.json and Meta's release against its checklist.chk before anything is
written; the output's manifest records what it was converted from."""

import hashlib
import json
import logging
import os
import shutil

import numpy as np
import pytest
from conftest import hf_model
from safetensors.numpy import load_file, save_file
from test_convert import CONFIGS, write_meta_checkpoint
from test_hostile_inputs import _refused

from llamax import convert
from llamax.cli import convert as convert_cli
from llamax.convert import manifest

UP1 = "model.layers.1.mlp.up_proj.weight"


def _edit_safetensors(path, change):
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.fixture
def hf_dir(tmp_path):
    hf_model(CONFIGS[1]).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def _hf_args(directory, dst="llamax"):
    return ["--from", "hf", "--to", dst, "--input", str(directory)]


# ----- non-finite tensors and overflow -----


@pytest.mark.parametrize("dst", ["llamax", "hf", "meta"])
def test_a_nan_tensor_is_refused_by_its_name(hf_dir, tmp_path, capsys, dst):
    def poison(tensors):
        tensors[UP1].reshape(-1)[:12] = np.nan

    _edit_safetensors(hf_dir / "model.safetensors", poison)
    size = CONFIGS[1].hidden_dim * CONFIGS[1].dim
    _refused(capsys, tmp_path, _hf_args(hf_dir, dst), f"{UP1} has NaN (12 of {size:,} values)")


def test_an_infinite_embedding_is_refused(hf_dir, tmp_path, capsys):
    def poison(tensors):
        tensors["model.embed_tokens.weight"][3, 5] = -np.inf

    _edit_safetensors(hf_dir / "model.safetensors", poison)
    _refused(capsys, tmp_path, _hf_args(hf_dir), "model.embed_tokens.weight has inf (1 of ")


@pytest.mark.parametrize(
    "dtype, value, advice",
    [("bfloat16", np.finfo(np.float32).max, ""), ("float16", 1e5, "--dtype float32")],
)  # fmt: skip
def test_float32_values_beyond_the_output_dtype_are_refused(hf_dir, tmp_path, capsys, dtype,
                                                            value, advice):  # fmt: skip
    def big(tensors):
        tensors[UP1][0, :3] = value

    _edit_safetensors(hf_dir / "model.safetensors", big)
    line = _refused(capsys, tmp_path, [*_hf_args(hf_dir), "--dtype", dtype],
                    f"{UP1} does not fit {dtype}: 3 of ", "would be infinite", advice)  # fmt: skip
    assert "does not fit" in line
    assert convert_cli.main([*_hf_args(hf_dir), "--output", str(tmp_path / "f32")]) == 0


def test_a_device_as_the_tokenizer_is_named_as_one(hf_dir, tmp_path, capsys):
    args = [*_hf_args(hf_dir), "--tokenizer", "/dev/zero"]
    _refused(capsys, tmp_path, args, "--tokenizer /dev/zero is a character device")


# ----- a directory llamax wrote: its manifest.json -----


@pytest.fixture
def llamax_hf(tiny_lm, tmp_path):
    """tiny_lm converted to Hugging Face's format by llamax (with its manifest.json)."""
    convert.convert("llamax", "hf", tiny_lm, str(tmp_path / "hf"))
    return tmp_path / "hf"


def test_a_flipped_byte_in_a_llamax_written_input_is_refused(llamax_hf, tmp_path, capsys):
    path = llamax_hf / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    _refused(capsys, tmp_path, _hf_args(llamax_hf), "manifest.json",
             "model.safetensors: sha256 differs from the manifest")  # fmt: skip


def _said(caplog, text):
    return [r for r in caplog.records if text in r.getMessage()]


def test_files_added_beside_a_llamax_written_input(llamax_hf, tmp_path, capsys, caplog):
    """A file the conversion reads and the manifest does not list is refused; one it does not
    read (a README) is left alone, and the input is said to be verified."""
    (llamax_hf / "extra.safetensors").write_bytes(b"x")
    _refused(capsys, tmp_path, _hf_args(llamax_hf), "unexpected file extra.safetensors")
    (llamax_hf / "extra.safetensors").unlink()
    (llamax_hf / "README.md").write_text("notes")
    with caplog.at_level(logging.INFO, logger="llamax"):
        assert convert_cli.main([*_hf_args(llamax_hf), "--output", str(tmp_path / "ok")]) == 0
    assert _said(caplog, "input was verified against its manifest.json")


def test_a_llamax_written_meta_input_is_verified(tiny_lm, tmp_path, capsys):
    convert.convert("llamax", "meta", tiny_lm, str(tmp_path / "meta"))
    shard = tmp_path / "meta" / "consolidated.00.pth"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x10
    shard.write_bytes(bytes(data))
    args = ["--from", "meta", "--to", "llamax", "--input", str(tmp_path / "meta")]
    _refused(capsys, tmp_path, args, "consolidated.00.pth: sha256 differs")


# ----- Meta's release: checklist.chk -----


def _md5(path):
    return hashlib.md5(open(path, "rb").read()).hexdigest()


@pytest.fixture
def release(tmp_path, tokenizer_path):
    """Meta's layout: `llama/` (shards, params.json, checklist.chk) beside tokenizer.model and
    tokenizer_checklist.chk, as Meta's download script leaves them."""
    config = CONFIGS[1].replace(vocab_size=600)
    directory = tmp_path / "release" / "llama"
    write_meta_checkpoint(hf_model(config), config, str(directory), 1)
    lines = [f"{_md5(directory / n)}  {n}\n" for n in ("consolidated.00.pth", "params.json")]
    (directory / "checklist.chk").write_text("".join(lines))
    shutil.copy(tokenizer_path, tmp_path / "release" / "tokenizer.model")
    (tmp_path / "release" / "tokenizer_checklist.chk").write_text(
        f"{_md5(tokenizer_path)}  tokenizer.model\n"
    )
    return directory


def _meta_args(directory):
    return ["--from", "meta", "--to", "llamax", "--input", str(directory)]


def test_a_release_that_matches_its_checklist_converts(release, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="llamax"):
        assert convert_cli.main([*_meta_args(release), "--output", str(tmp_path / "ok")]) == 0
    assert _said(caplog, "input was verified against its checklist.chk")
    assert os.path.exists(tmp_path / "ok" / "tokenizer.model")


@pytest.mark.parametrize(
    "checklist, problem",
    [({"consolidated.00.pth": "0" * 32}, "checklist.chk's 00000000"),
     ({"params.json": "f" * 32}, "params.json: md5 "),
     ({"consolidated.01.pth": "0" * 32}, "checklist.chk lists consolidated.01.pth, which is not"),
     ({"params.json": None}, "params.json is read but"),
     ({"garbage": "not md5sum"}, "line 3 is not '<md5>  <file name>'")],
)  # fmt: skip
def test_a_release_that_differs_from_its_checklist_is_refused(release, tmp_path, capsys,
                                                              checklist, problem):  # fmt: skip
    path = release / "checklist.chk"
    sums = dict(reversed(line.split("  ")) for line in path.read_text().splitlines())
    for name, md5 in checklist.items():
        if md5 is None:
            del sums[name]
        else:
            sums[name] = md5
    lines = [f"{md5}  {name}" if len(md5) == 32 else md5 for name, md5 in sums.items()]
    path.write_text("\n".join(lines) + "\n")
    _refused(capsys, tmp_path, _meta_args(release), problem)


def test_a_tokenizer_that_differs_from_its_checklist_is_refused(release, tmp_path, capsys):
    (release.parent / "tokenizer_checklist.chk").write_text(f"{'1' * 32}  tokenizer.model\n")
    _refused(capsys, tmp_path, _meta_args(release), "tokenizer.model: md5 ", "11111111")


def test_an_input_without_checksums_is_said_to_be_unverified(hf_dir, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="llamax"):
        convert.convert("hf", "llamax", str(hf_dir), str(tmp_path / "out"))
    unverified = _said(caplog, "could not be verified")
    assert len(unverified) == 1 and str(hf_dir) in unverified[0].getMessage()


# ----- the output's manifest records its source -----


def test_the_manifest_records_the_source(hf_dir, tmp_path):
    out = tmp_path / "out"
    convert.convert("hf", "llamax", str(hf_dir), str(out))
    recorded = json.loads((out / "manifest.json").read_text())["source"]
    assert recorded == {"format": "hf", "path": str(hf_dir)}
    assert manifest.source(str(out)) == recorded and convert.verify(str(out)) == []
    older = json.loads((out / "manifest.json").read_text())
    del older["source"]  # as llamax wrote manifests before
    (out / "manifest.json").write_text(json.dumps(older))
    assert manifest.source(str(out)) is None
