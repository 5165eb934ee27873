"""Hostile PEFT adapters: a NaN, an overflowing scale, integer tensors, a header declaring a
40 GB tensor, and every kind of malformed `adapter_config.json` give one `error:` line naming
the file and the tensor or field, exit code 2, bounded memory and nothing written, from
`llamax-convert --from peft` and from `--adapters`; and exported adapters name a base PEFT can
load (`AutoPeftModelForCausalLM`, offline)."""

import json
import os
import shutil
import struct
import tracemalloc

import numpy as np
import pytest
from conftest import hf_logits, hf_model, load_config
from safetensors.numpy import load_file, save_file

import llamax
from llamax import convert, loading, lora
from llamax.cli import convert as convert_cli
from llamax.cli import generate as generate_cli
from llamax.cli import reward as reward_cli
from llamax.convert import peft
from llamax.convert.formats import FormatError

CONFIG = llamax.LlamaConfig.preset("tiny", vocab_size=600)  # tiny_lm's
Q0_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
V1_A = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
DOWN1_B = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"


@pytest.fixture(scope="module")
def adapters(tiny_lm, tmp_path_factory):
    """Adapters saved by `peft` itself on tiny_lm converted to Hugging Face's format, their B
    moved off zero so that they count."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("peft")
    convert.convert("llamax", "hf", tiny_lm, str(root / "hf"))
    model = LlamaForCausalLM.from_pretrained(str(root / "hf"), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = get_peft_model(model, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn_like(p))
    peft_model.save_pretrained(str(root / "adapters"))
    return str(root / "adapters")


def _copy(adapters, tmp_path):
    return shutil.copytree(adapters, tmp_path / "adapters")


def _weights(directory):
    return load_file(str(directory / peft.WEIGHTS_FILE))


def _save(directory, tensors):
    save_file(tensors, str(directory / peft.WEIGHTS_FILE), metadata={"format": "pt"})


def _config(directory):
    return json.loads((directory / peft.CONFIG_FILE).read_text())


def _one_error(capsys, code, prog, *names):
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if f"{prog}: error:" in line]
    assert code == 2, err[-3000:]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    for name in names:
        assert name in errors[0], (name, errors[0])
    return errors[0]


def _refused(capsys, tmp_path, directory, base, *names):
    """`llamax-convert --from peft` exits 2 with one error line naming `names`, writing
    nothing."""
    out = tmp_path / "out"
    capsys.readouterr()
    code = convert_cli.main(["--from", "peft", "--to", "llamax", "--input", str(directory),
                             "--base", base, "--output", str(out)])  # fmt: skip
    line = _one_error(capsys, code, "llamax-convert", *names)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out")]
    return line


def test_intact_adapters_convert_and_import(adapters, tiny_lm, tmp_path, capsys):
    """The directory the other tests corrupt is good: what they see is their corruption."""
    tree, config = peft.import_adapters(adapters, CONFIG)
    assert config.rank == 4 and config.targets == ("wq", "wv", "w2") and config.scale == 2.0
    assert np.abs(tree["layers"]["attention"]["wq_lora_b"]).max() > 0
    out = str(tmp_path / "merged")
    assert convert_cli.main(["--from", "peft", "--to", "llamax", "--input", adapters,
                             "--base", tiny_lm, "--output", out]) == 0  # fmt: skip
    assert convert.verify(out) == []


# ----- non-finite adapters and merged weights -----


@pytest.mark.parametrize("name, value, kind", [(V1_A, np.nan, "NaN"), (DOWN1_B, np.inf, "inf")])
def test_non_finite_adapters_are_refused_naming_the_tensor(
    adapters, tiny_lm, tiny_rm, tmp_path, capsys, name, value, kind
):
    directory = _copy(adapters, tmp_path)
    tensors = _weights(directory)
    tensors[name][0, :3] = value
    _save(directory, tensors)
    line = _refused(capsys, tmp_path, directory, tiny_lm, name, f"{kind} (3 of ")
    assert peft.WEIGHTS_FILE in line
    with pytest.raises(FormatError, match=f"{name} has {kind}"):
        peft.import_adapters(str(directory), CONFIG)

    code = generate_cli.main(["--checkpoint", tiny_lm, "--adapters", str(directory),
                              "--prompt", "the model", "--max-new-tokens", "2"])  # fmt: skip
    _one_error(capsys, code, "llamax-generate", name, kind)
    # A language model's adapters on a reward model: scored NaN, if they were accepted.
    (tmp_path / "answers.jsonl").write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    scored = tmp_path / "scored.jsonl"
    code = reward_cli.main(["score", "--checkpoint", tiny_rm, "--adapters", str(directory),
                            "--input", str(tmp_path / "answers.jsonl"),
                            "--output", str(scored)])  # fmt: skip
    _one_error(capsys, code, "llamax-reward", name, kind)
    assert not scored.exists()


def test_a_scale_beyond_float32_is_refused_by_the_config(adapters, tiny_lm, tmp_path, capsys):
    directory = _copy(adapters, tmp_path)
    (directory / peft.CONFIG_FILE).write_text(json.dumps({**_config(directory),
                                                          "lora_alpha": 1e308}))  # fmt: skip
    _refused(capsys, tmp_path, directory, tiny_lm, "adapter_config.json", "lora_alpha 1e+308",
             "beyond float32's range")  # fmt: skip
    code = generate_cli.main(["--checkpoint", tiny_lm, "--adapters", str(directory),
                              "--prompt", "x"])  # fmt: skip
    _one_error(capsys, code, "llamax-generate", "lora_alpha")


@pytest.fixture
def overflowing(adapters, tmp_path):
    """Finite adapters with a finite scale whose merged weights overflow float32: B 1e4 times
    larger, lora_alpha 1e38 (a scale of 2.5e37)."""
    directory = _copy(adapters, tmp_path)
    tensors = {k: v * 1e4 if ".lora_B." in k else v for k, v in _weights(directory).items()}
    _save(directory, tensors)
    (directory / peft.CONFIG_FILE).write_text(json.dumps({**_config(directory),
                                                          "lora_alpha": 1e38}))  # fmt: skip
    return directory


def test_merged_weights_that_overflow_are_refused(overflowing, tiny_lm, tmp_path, capsys):
    """Each check at its place: the converter's lazy merge, and `lora.merge` (the loaders')."""
    _refused(capsys, tmp_path, overflowing, tiny_lm,
             "model.layers.0.self_attn.q_proj.weight with the LoRA adapters merged")  # fmt: skip
    with pytest.raises(ValueError, match="layers/attention/wq with the adapters merged .* NaN or "
                                         "infinite"):  # fmt: skip
        loading.load_pretrained(tiny_lm, adapters=str(overflowing))
    code = generate_cli.main(["--checkpoint", tiny_lm, "--adapters", str(overflowing),
                              "--prompt", "x", "--max-new-tokens", "2"])  # fmt: skip
    _one_error(capsys, code, "llamax-generate", "layers/attention/wq")


def test_lora_merge_refuses_a_non_finite_weight_by_name():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 6, 5)).astype(np.float32)  # 3 layers stacked
    a, b = rng.normal(size=(3, 6, 2)).astype(np.float32), np.ones((3, 2, 5), np.float32)
    b[1, 1, 2] = np.nan
    params = {"layers": {"feed_forward": {"w1": w, "w1_lora_a": a, "w1_lora_b": b}}}
    config = lora.LoraConfig(rank=2, alpha=4, targets=("w1",))
    with pytest.raises(ValueError, match=r"layers/feed_forward/w1 .* has 6 of 90 values NaN or "
                                         r"infinite, the first in layer 1"):  # fmt: skip
        lora.merge(params, config)
    b[1, 1, 2] = 1.0
    merged = lora.merge(params, config)["layers"]["feed_forward"]["w1"]
    np.testing.assert_allclose(merged, w + 2.0 * a @ b, rtol=1e-5)
    unstacked = {"w1": w[0], "w1_lora_a": a[0], "w1_lora_b": b[0] * 1e38}
    with pytest.raises(ValueError, match=r"LoRA merge: w1 with .* has \d+ of 30 values NaN or "
                                         r"infinite: the adapters"):  # fmt: skip
        lora.merge(unstacked, config)


def test_non_finite_adapters_are_not_exported(adapters, tmp_path):
    tree, config = peft.import_adapters(adapters, CONFIG)
    tree["layers"]["feed_forward"]["w2_lora_b"][1, 0, 7] = np.nan
    out = tmp_path / "exported"
    with pytest.raises(FormatError, match=f"adapters to export: {DOWN1_B} has NaN \\(1 of 256"):
        peft.export_adapters(tree, config, str(out))
    assert not os.listdir(tmp_path)


# ----- tensors: names, shapes and dtypes from the header, before anything is read -----


def test_integer_adapters_are_refused(adapters, tiny_lm, tmp_path, capsys):
    directory = _copy(adapters, tmp_path)
    _save(directory, {k: (v * 100).astype(np.int32) for k, v in _weights(directory).items()})
    _refused(capsys, tmp_path, directory, tiny_lm, "is int32; adapters are floating point")


def _forty_gb_file(directory, name, shape):
    """The adapters' file with tensor `name` declared as `shape` of float32 (40 GB) last in
    the data: a sparse file of its full size, holding only the header and the real tensors."""
    tensors = _weights(directory)
    tensors.pop(name, None)
    header, data, offset = {}, [], 0
    for key, value in tensors.items():
        raw = np.ascontiguousarray(value).tobytes()
        header[key] = {"dtype": "F32", "shape": list(value.shape),
                       "data_offsets": [offset, offset + len(raw)]}  # fmt: skip
        data.append(raw)
        offset += len(raw)
    size = int(np.prod(shape)) * 4
    header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
    raw_header = json.dumps(header).encode()
    path = directory / peft.WEIGHTS_FILE
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw_header)) + raw_header + b"".join(data))
        f.truncate(8 + len(raw_header) + offset + size)
    assert os.path.getsize(path) > 40e9 and os.stat(path).st_blocks * 512 < 1e6
    return path


@pytest.mark.parametrize(
    "name, problem",
    [(Q0_A, rf"{Q0_A} has shape \(4, 2500000000\), expected \(4, 64\)"),
     ("base_model.model.lm_head.weight", "tensors llamax does not know")],
)  # fmt: skip
def test_a_40_gb_tensor_is_refused_from_the_header(adapters, tiny_lm, tmp_path, capsys, name,
                                                   problem):  # fmt: skip
    directory = _copy(adapters, tmp_path)
    _forty_gb_file(directory, name, (4, 2_500_000_000))
    tracemalloc.start()
    with pytest.raises(FormatError, match=problem):
        peft.import_adapters(str(directory), CONFIG)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 << 20, peak
    _refused(capsys, tmp_path, directory, tiny_lm, peft.WEIGHTS_FILE)


def test_a_rank_beyond_the_matrices_is_refused(adapters, tiny_lm, tmp_path, capsys):
    directory = _copy(adapters, tmp_path)
    (directory / peft.CONFIG_FILE).write_text(json.dumps({**_config(directory), "r": 10**6}))
    _refused(capsys, tmp_path, directory, tiny_lm, "adapter_config.json", "r 1000000 is more")


# ----- adapter_config.json -----


def _nested(depth):
    return "[" * depth + "]" * depth


BAD_CONFIGS = {
    # name: (what to write: a change to the config, or raw bytes; what the error names)
    "missing r": (lambda c: {k: v for k, v in c.items() if k != "r"}, "r must be a positive"),
    "r a bool": (lambda c: {**c, "r": True}, "r must be a positive integer, got true"),
    "r zero": (lambda c: {**c, "r": 0}, "r must be a positive integer, got 0"),
    "a list": (lambda c: [c], "a JSON list, not an adapter config object"),
    "int target_modules": (
        lambda c: {**c, "target_modules": 5},
        "target_modules must be a list of module names, got 5",
    ),
    "list of ints": (lambda c: {**c, "target_modules": [1, 2]}, "target_modules must be a list"),
    "regex target_modules": (
        lambda c: {**c, "target_modules": ".*proj"},
        'target_modules ".*proj" is a pattern',
    ),
    "nested 100k deep": (_nested(100_000).encode(), "nested too deep"),
    "deep inside": (
        lambda c: {**c, "lora_dropout": json.loads(_nested(500))},
        "lora_dropout must be a number in [0, 1)",
    ),
    "empty": (b"", "is empty"),
    "/etc/passwd": (b"root:x:0:0:root:/root:/bin/bash\n", "is not JSON"),
    "not UTF-8": (b'{"r": "\xff\xfe"}', "is not UTF-8"),
    "rslora a string": (
        lambda c: {**c, "use_rslora": "no"},
        'use_rslora must be true or false, got "no"',
    ),
    "dora a number": (lambda c: {**c, "use_dora": 0}, "use_dora must be true or false"),
    "alpha NaN": (
        lambda c: {**c, "lora_alpha": float("nan")},
        "lora_alpha must be a finite positive number, got nan",
    ),
    "alpha negative": (lambda c: {**c, "lora_alpha": -8}, "lora_alpha must be a finite positive"),
    "alpha a string": (lambda c: {**c, "lora_alpha": "8"}, "lora_alpha must be a finite positive"),
    "dropout 1.5": (lambda c: {**c, "lora_dropout": 1.5}, "lora_dropout must be a number"),
    "modules_to_save a string": (
        lambda c: {**c, "modules_to_save": "score"},
        "modules_to_save must be null or a list",
    ),
    "PiSSA": (
        lambda c: {**c, "init_lora_weights": "pissa"},
        'init_lora_weights "pissa" changes the base\'s own weights',
    ),
    "a 2 MB config": (lambda c: {**c, "padding": "x" * (2 << 20)}, "not an adapter config"),
    "not LoRA": (lambda c: {**c, "peft_type": "IA3"}, "not a LoRA adapter"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_malformed_adapter_configs_are_named(adapters, tiny_lm, tmp_path, capsys, case):
    change, problem = BAD_CONFIGS[case]
    directory = _copy(adapters, tmp_path)
    path = directory / peft.CONFIG_FILE
    content = change if isinstance(change, bytes) else json.dumps(change(_config(directory)))
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    _refused(capsys, tmp_path, directory, tiny_lm, str(path), problem)
    code = generate_cli.main(["--checkpoint", tiny_lm, "--adapters", str(directory),
                              "--prompt", "x"])  # fmt: skip
    _one_error(capsys, code, "llamax-generate", str(path), problem)


def test_a_device_as_the_config_is_named_as_one(adapters, tiny_lm, tmp_path, capsys):
    directory = _copy(adapters, tmp_path)
    path = directory / peft.CONFIG_FILE
    path.unlink()
    path.symlink_to("/dev/zero")
    tracemalloc.start()
    _refused(capsys, tmp_path, directory, tiny_lm, str(path), "is a character device")
    assert tracemalloc.get_traced_memory()[1] < 16 << 20
    tracemalloc.stop()


# ----- exported adapters name a base PEFT can load -----


@pytest.fixture(scope="module")
def hf_based_run(tmp_path_factory):
    """A 2-step LoRA run on a base converted from a Hugging Face directory, and a Meta release
    of the same weights converted too."""
    from test_convert import write_meta_checkpoint

    from llamax import train

    root = tmp_path_factory.mktemp("hf_based")
    model = hf_model(CONFIG)
    model.save_pretrained(str(root / "hf"))
    convert.convert("hf", "llamax", str(root / "hf"), str(root / "base"))
    write_meta_checkpoint(model, CONFIG, str(root / "meta"), 1)
    convert.convert("meta", "llamax", str(root / "meta"), str(root / "meta-base"))
    c = load_config("tiny", **{
        "model.vocab_size": 600, "lora.rank": 4, "lora.alpha": 8.0, "lora.targets": "wq,wv,w2",
        "train.steps": 2, "train.eval_every": 0, "checkpoint.every": 2,
        "checkpoint.async_save": False, "optimizer.learning_rate": 1e-2,
        "optimizer.warmup_steps": 0,
    })  # fmt: skip
    c.init_from = str(root / "base")
    train.run(c, str(root / "run"))
    return root


@pytest.mark.slow
def test_export_names_the_hf_base_and_peft_loads_it_offline(hf_based_run, tmp_path, monkeypatch,
                                                            rng):  # fmt: skip
    import huggingface_hub
    import torch
    from peft import AutoPeftModelForCausalLM

    root = hf_based_run
    out = str(tmp_path / "adapters")
    assert convert_cli.main(["--from", "llamax", "--to", "peft", "--input", str(root / "run"),
                             "--output", out]) == 0  # fmt: skip
    recorded = json.loads(open(os.path.join(out, peft.CONFIG_FILE)).read())
    assert recorded["base_model_name_or_path"] == str(root / "hf")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = AutoPeftModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    model, params = loading.load_pretrained(str(root / "run"))
    tokens = rng.integers(0, CONFIG.vocab_size, (2, 16), dtype=np.int32)
    want = np.asarray(model.apply({"params": params}, tokens))
    np.testing.assert_allclose(hf_logits(loaded, tokens), want, atol=1e-4)
    base, base_params = loading.load_pretrained(str(root / "base"))
    assert np.abs(np.asarray(base.apply({"params": base_params}, tokens)) - want).max() > 1e-3


@pytest.mark.slow
def test_export_from_a_base_not_from_hf_needs_base_name(hf_based_run, tmp_path, capsys):
    """The run's base recorded as the Meta release's conversion (the same weights): refused
    with the advice, unless --base-name names the base; a llamax directory there is refused."""
    run = shutil.copytree(hf_based_run / "run", tmp_path / "run")
    recorded = json.loads((run / "config.json").read_text())
    meta_base = str(hf_based_run / "meta-base")
    (run / "config.json").write_text(json.dumps({**recorded, "init_from": meta_base}))
    args = ["--from", "llamax", "--to", "peft", "--input", str(run)]
    capsys.readouterr()
    code = convert_cli.main([*args, "--output", str(tmp_path / "out")])
    _one_error(capsys, code, "llamax-convert", "it was converted from meta", "--base-name",
               f"llamax-convert --from llamax --to hf --input {meta_base} "
               f"--output {meta_base}-hf")  # fmt: skip
    assert not (tmp_path / "out").exists()

    code = convert_cli.main([*args, "--base-name", meta_base, "--output", str(tmp_path / "out")])
    _one_error(capsys, code, "llamax-convert", f"--base-name {meta_base} is not a Hugging Face")
    out = tmp_path / "named"
    name = "meta-llama/Llama-2-7b-hf"
    assert convert_cli.main([*args, "--base-name", name, "--output", str(out)]) == 0
    assert json.loads((out / peft.CONFIG_FILE).read_text())["base_model_name_or_path"] == name
