"""LoRA: the base exactly at step 0, merged equals unmerged, and adapters that Hugging Face
PEFT loads on the converted base with logits equal to llamax's; PEFT adapters imported back."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_logits, hf_model, llamax_params_from

import llamax
from llamax import lora as lora_lib
from llamax.convert import peft as peft_lib
from llamax.lora import LoraConfig

CONFIG = llamax.LlamaConfig.preset("tiny", n_layers=2, n_kv_heads=2)
ALL = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def _unbox(tree):
    return jax.tree.map(
        lambda x: getattr(x, "value", x), tree, is_leaf=lambda x: hasattr(x, "value")
    )


def lora_params(lora, base, seed=0, std=0.05):
    """The base's parameters with random adapters (B not zero, so that they count)."""
    model = llamax.Llama(CONFIG, lora=lora)
    init = _unbox(model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"])
    _, adapters = lora_lib.split(init)
    rng = np.random.default_rng(seed)
    adapters = jax.tree.map(
        lambda x: jnp.asarray(std * rng.normal(size=x.shape), x.dtype), adapters
    )
    return lora_lib.combine(base, adapters), adapters


def test_step_zero_is_the_base_exactly(rng):
    base = _unbox(
        llamax.Llama(CONFIG).init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"]
    )
    lora = LoraConfig(rank=4, alpha=8, targets=ALL)
    model = llamax.Llama(CONFIG, lora=lora)
    init = _unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    _, adapters = lora_lib.split(init)
    for name, leaf in jax.tree_util.tree_leaves_with_path(adapters):
        path = jax.tree_util.keystr(name)
        assert leaf.shape[0] == CONFIG.n_layers
        if path.endswith("_lora_b']"):
            assert not np.any(leaf)  # B starts at zero
        else:  # A: PEFT's kaiming-uniform bound 1/sqrt(fan_in)
            bound = 1 / np.sqrt(np.prod(leaf.shape[1:-1]))
            assert 0.5 * bound < np.abs(leaf).max() <= bound
    tokens = rng.integers(0, CONFIG.vocab_size, (2, 12), dtype=np.int32)
    want = llamax.Llama(CONFIG).apply({"params": base}, tokens)
    got = model.apply({"params": lora_lib.combine(base, adapters)}, tokens)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_equals_unmerged(rslora, rng):
    base = _unbox(
        llamax.Llama(CONFIG).init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"]
    )
    lora = LoraConfig(rank=4, alpha=16, targets=ALL, rslora=rslora)
    params, _ = lora_params(lora, base)
    tokens = rng.integers(0, CONFIG.vocab_size, (2, 12), dtype=np.int32)
    unmerged = llamax.Llama(CONFIG, lora=lora).apply({"params": params}, tokens)
    merged = llamax.Llama(CONFIG).apply({"params": lora_lib.merge(params, lora)}, tokens)
    np.testing.assert_allclose(merged, unmerged, atol=1e-4)
    plain = llamax.Llama(CONFIG).apply({"params": base}, tokens)
    assert np.abs(plain - unmerged).max() > 1e-2  # the adapters change the logits


def test_the_scale_and_the_update_are_loras(rng):
    """One weight by hand: x W + alpha/r (x A) B, and alpha/sqrt(r) with rsLoRA."""
    assert LoraConfig(rank=16, alpha=32).scale == 2.0
    assert LoraConfig(rank=16, alpha=32, rslora=True).scale == 8.0
    w = rng.normal(size=(6, 5)).astype(np.float32)
    a, b = rng.normal(size=(6, 3)).astype(np.float32), rng.normal(size=(3, 5)).astype(np.float32)
    merged = lora_lib.merge({"w1": w, "w1_lora_a": a, "w1_lora_b": b}, LoraConfig(rank=3, alpha=6))
    np.testing.assert_allclose(merged["w1"], w + 2.0 * a @ b, rtol=1e-6)
    assert set(merged) == {"w1"}


@pytest.mark.parametrize(
    "kwargs, message",
    [({"rank": 0}, "rank must be a positive integer"), ({"targets": ("wz",)}, "targets must be"),
     ({"targets": ()}, "targets must be"), ({"dropout": 1.0}, "dropout must be in")],
)  # fmt: skip
def test_bad_lora_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)
    with pytest.raises(ValueError, match="Unknown LoRA config key"):
        LoraConfig.from_dict({"rank": 4, "ranks": 4})


def test_dropout_applies_only_with_a_dropout_rng(rng):
    base = _unbox(
        llamax.Llama(CONFIG).init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"]
    )
    lora = LoraConfig(rank=4, targets=("wq", "w2"), dropout=0.5)
    params, _ = lora_params(lora, base)
    model = llamax.Llama(CONFIG, lora=lora)
    tokens = rng.integers(0, CONFIG.vocab_size, (2, 12), dtype=np.int32)
    plain = model.apply({"params": params}, tokens)
    np.testing.assert_array_equal(model.apply({"params": params}, tokens), plain)
    dropped = model.apply({"params": params}, tokens, rngs={"dropout": jax.random.key(3)})
    assert np.abs(dropped - plain).max() > 1e-3


@pytest.mark.parametrize("targets", [("wq", "wv"), ALL])
def test_peft_loads_the_exported_adapters_with_equal_logits(targets, tmp_path, rng):
    from peft import PeftModel

    hf = hf_model(CONFIG)
    base = llamax_params_from(hf, CONFIG)
    lora = LoraConfig(rank=4, alpha=8, targets=targets, rslora=len(targets) > 2)
    params, adapters = lora_params(lora, base)
    out = str(tmp_path / "adapter")
    peft_lib.export_adapters(adapters, lora, out, base_model="llamax-tiny")
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    with open(os.path.join(out, "adapter_config.json")) as f:
        config = json.load(f)
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"

    peft_model = PeftModel.from_pretrained(hf, out).eval()
    tokens = rng.integers(0, CONFIG.vocab_size, (2, 16), dtype=np.int32)
    want = hf_logits(peft_model, tokens)
    got = llamax.Llama(CONFIG, lora=lora).apply({"params": params}, tokens)
    np.testing.assert_allclose(got, want, atol=1e-4)

    # And back: the same adapters and config.
    imported, lora_back = peft_lib.import_adapters(out, CONFIG)
    assert lora_back == lora
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), imported, adapters)


def test_adapters_saved_by_peft_are_imported(tmp_path, rng):
    """What PEFT itself writes (its names, its config), trained a little off zero."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    hf = hf_model(CONFIG)
    base = llamax_params_from(hf, CONFIG)  # before PEFT wraps its layers in place
    peft_config = PeftLoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "down_proj"])
    peft_model = get_peft_model(hf, peft_config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn_like(p))
    peft_model.save_pretrained(str(tmp_path / "saved"))
    tokens = rng.integers(0, CONFIG.vocab_size, (2, 16), dtype=np.int32)
    want = hf_logits(peft_model.eval(), tokens)

    adapters, lora = peft_lib.import_adapters(str(tmp_path / "saved"), CONFIG)
    assert lora.targets == ("wq", "w2") and lora.scale == 3.0
    params = lora_lib.combine(base, adapters)
    got = llamax.Llama(CONFIG, lora=lora).apply({"params": params}, tokens)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_unsupported_peft_settings_are_named(tmp_path):
    out = tmp_path / "a"
    out.mkdir()
    config = peft_lib.adapter_config(LoraConfig())
    (out / "adapter_config.json").write_text(
        json.dumps({**config, "use_dora": True, "bias": "all"})
    )
    with pytest.raises(ValueError, match=r"\['bias', 'use_dora'\]"):
        peft_lib.import_adapters(str(out), CONFIG)
    (out / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["lm_head"]}))
    with pytest.raises(ValueError, match="are not Llama's"):
        peft_lib.import_adapters(str(out), CONFIG)
    (out / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors not found"):
        peft_lib.import_adapters(str(out), CONFIG)


# ----- training LoRA adapters with llamax-train -----

LORA_RUN = {"lora.rank": 4, "lora.alpha": 8.0, "lora.targets": "wq,wv,w2", "train.steps": 8,
            "train.log_every": 1, "train.eval_every": 4, "checkpoint.every": 4}  # fmt: skip


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    from conftest import load_config

    from llamax import train

    path = str(tmp_path_factory.mktemp("base") / "run")
    train.run(load_config("tiny", **{"train.steps": 6, "train.eval_every": 0}), path)
    return path


def _files(directory):
    import hashlib

    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), directory)] = hashlib.sha256(
                    f.read()
                ).hexdigest()
    return out


@pytest.fixture(scope="module")
def base_step_loss(base_run, tmp_path_factory):
    """The loss of one step of full fine-tuning from `base_run` on the LoRA runs' data: the
    base's own loss on their first batch."""
    from conftest import load_config

    from llamax import train
    from llamax.metrics import read_metrics

    full = load_config("tiny", **{**LORA_RUN, "lora.rank": 0, "train.steps": 1})
    full.init_from = base_run
    path = str(tmp_path_factory.mktemp("full") / "run")
    train.run(full, path)
    return read_metrics(path)[0]["loss"], path


@pytest.fixture(scope="module")
def lora_run(base_run, tmp_path_factory):
    """8 steps of LoRA on `base_run`, checkpoints at steps 4 and 8."""
    from conftest import load_config

    from llamax import train

    c = load_config("tiny", **LORA_RUN)
    c.init_from = base_run
    path = str(tmp_path_factory.mktemp("lora") / "run")
    train.run(c, path)
    return path


@pytest.mark.slow
def test_lora_run_trains_only_adapters_and_resumes_exactly_on_another_mesh(
    base_run, lora_run, base_step_loss, tmp_path
):
    from conftest import load_config

    from llamax import setup, train
    from llamax.metrics import read_metrics

    before = _files(base_run)
    c = load_config("tiny", **LORA_RUN)
    c.init_from = base_run
    s = setup.build(c, setup.make_mesh(c))
    names = [
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(s.abstract.params)
    ]
    assert names and all("_lora_" in n for n in names)  # the optimizer sees adapters only
    assert s.abstract.frozen["layers"]["attention"]["wq"].dtype == jnp.bfloat16

    straight = read_metrics(lora_run)
    assert straight[-1]["loss"] < straight[0]["loss"]

    # Step 1's loss is the base's: a full fine-tuning run from the same base sees it too.
    np.testing.assert_allclose(straight[0]["loss"], base_step_loss[0], rtol=2e-3)

    # Stopped after the checkpoint of step 4, resumed on a data x fsdp x tensor mesh: the
    # same steps after it.
    import shutil

    resumed_dir = str(tmp_path / "resumed")
    shutil.copytree(lora_run, resumed_dir)
    shutil.rmtree(os.path.join(resumed_dir, "checkpoints", "8"))
    again = load_config("tiny", **{**LORA_RUN, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    again.init_from = base_run
    train.run(again, resumed_dir)
    last = {r["step"]: r["loss"] for r in read_metrics(resumed_dir)}
    want = {r["step"]: r["loss"] for r in straight}
    np.testing.assert_allclose(
        [last[k] for k in (5, 6, 7, 8)], [want[k] for k in (5, 6, 7, 8)], rtol=1e-4
    )
    assert _files(base_run) == before  # the base is untouched

    # Another base is a change of the run, and even when accepted, refused at resume.
    other = load_config("tiny", **LORA_RUN)
    other.init_from = base_step_loss[1]
    with pytest.raises(ValueError, match="would change init_from"):
        train.run(other, resumed_dir)
    other.train.accept_changes = True
    with pytest.raises(ValueError, match="adapters only fit the base they were trained on"):
        train.run(other, resumed_dir)


@pytest.mark.slow
def test_a_lora_run_loads_merged_and_converts_to_hf_and_peft(base_run, lora_run, tmp_path, rng):
    """llamax-generate/-eval's loader merges a LoRA run's adapters into its base; the run
    converts to a merged Hugging Face model and to PEFT adapters that `peft` loads on the
    converted base, all with the same logits; PEFT adapters merge back into a llamax
    checkpoint."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from llamax import convert, pretrained
    from llamax.convert import native

    model, merged = pretrained.load_pretrained(lora_run)
    assert model.lora is None
    _, base = pretrained.load_pretrained(base_run)
    adapters, lora, base_path = native.read_adapters(lora_run)
    assert base_path == base_run and lora.targets == ("wq", "wv", "w2") and lora.rank == 4
    tokens = rng.integers(0, model.config.vocab_size, (2, 16), dtype=np.int32)
    unmerged = llamax.Llama(model.config, lora=lora).apply(
        {"params": lora_lib.combine(base, adapters)}, tokens
    )
    np.testing.assert_allclose(model.apply({"params": merged}, tokens), unmerged, atol=1e-4)

    out = {name: str(tmp_path / name) for name in ("hf_base", "hf_merged", "peft", "back")}
    convert.convert("llamax", "hf", base_run, out["hf_base"])
    convert.convert("llamax", "hf", lora_run, out["hf_merged"])
    convert.convert("llamax", "peft", lora_run, out["peft"])
    hf = LlamaForCausalLM.from_pretrained(out["hf_base"], dtype="float32")
    with_adapters = hf_logits(PeftModel.from_pretrained(hf, out["peft"]).eval(), tokens)
    np.testing.assert_allclose(with_adapters, unmerged, atol=1e-4)
    hf_merged = LlamaForCausalLM.from_pretrained(out["hf_merged"], dtype="float32").eval()
    np.testing.assert_allclose(hf_logits(hf_merged, tokens), unmerged, atol=1e-4)

    convert.convert("peft", "llamax", out["peft"], out["back"], base=base_run)
    back_model, back = pretrained.load_pretrained(out["back"])
    np.testing.assert_allclose(back_model.apply({"params": back}, tokens), unmerged, atol=1e-4)
    with pytest.raises(ValueError, match="needs --base"):
        convert.convert("peft", "llamax", out["peft"], str(tmp_path / "x"))
    with pytest.raises(ValueError, match="not the workdir of a LoRA run"):
        convert.convert("llamax", "peft", base_run, str(tmp_path / "y"))


def test_int8_quantization_is_per_channel_absmax(rng):
    base = _unbox(
        llamax.Llama(CONFIG).init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"]
    )
    quantized = lora_lib.quantize(base)
    attention = quantized["layers"]["attention"]
    assert attention["wq"].dtype == jnp.int8 and attention["wq_scale"].shape == (2, 4, 16)
    assert attention["wo_scale"].shape == (2, 64)  # wo is [L, N, H, D]: one scale per D
    assert quantized["tok_embeddings"].dtype == base["tok_embeddings"].dtype  # not a matrix
    for name in ("wq", "wo"):
        w = np.asarray(base["layers"]["attention"][name])
        back = lora_lib.dequantize_int8(attention[name], attention[f"{name}_scale"], name)
        inputs = (1,) if name == "wq" else (1, 2)
        scale = np.expand_dims(np.asarray(attention[f"{name}_scale"]), inputs)
        assert np.all(np.abs(np.asarray(back) - w) <= scale / 2 + 1e-7)
        assert np.abs(np.asarray(attention[name])).max() == 127

    # The int8 model computes with exactly the dequantized weights.
    tokens = rng.integers(0, CONFIG.vocab_size, (2, 12), dtype=np.int32)
    int8 = llamax.Llama(CONFIG, llamax.Execution(weight_quantization="int8"))
    dequantized = lora_lib.merge(quantized, LoraConfig())  # no adapters: dequantizes only
    np.testing.assert_array_equal(
        int8.apply({"params": quantized}, tokens),
        llamax.Llama(CONFIG).apply({"params": dequantized}, tokens),
    )


@pytest.mark.slow
def test_lora_on_an_int8_base(base_run, base_step_loss, tmp_path):
    from conftest import load_config

    from llamax import setup, train
    from llamax.convert import native
    from llamax.metrics import read_metrics

    c = load_config("tiny", **{**LORA_RUN, "lora.base_dtype": "int8", "train.steps": 3})
    c.init_from = base_run
    s = setup.build(c, setup.make_mesh(c))
    attention = s.abstract.frozen["layers"]["attention"]
    assert attention["wq"].dtype == jnp.int8 and attention["wq_scale"].dtype == jnp.float32
    assert s.abstract.frozen["norm"]["scale"].dtype == jnp.bfloat16
    train.run(c, str(tmp_path / "run"))
    assert all(np.isfinite(r["loss"]) for r in read_metrics(str(tmp_path / "run")))
    adapters, _, _ = native.read_adapters(str(tmp_path / "run"))  # trained: B moved off zero
    assert np.abs(adapters["layers"]["attention"]["wq_lora_b"]).max() > 0
    # Step 1 is the int8 base's loss: close to the float base's.
    int8_step = read_metrics(str(tmp_path / "run"))[0]["loss"]
    np.testing.assert_allclose(int8_step, base_step_loss[0], rtol=2e-2)


@pytest.mark.parametrize(
    "overrides, message",
    [({"lora.rank": 4}, "set init_from"),
     ({"lora.rank": 4, "lora.targets": "wq,wx"}, "targets must be distinct names"),
     ({"lora.rank": 4, "lora.base_dtype": "int4"}, "lora.base_dtype must be one of"),
     ({"lora.rank": -1}, "rank must be a positive integer")],
)  # fmt: skip
def test_bad_lora_settings_are_named(overrides, message):
    from conftest import load_config

    from llamax import experiment

    c = load_config("tiny", **overrides)
    with pytest.raises(ValueError, match=message):
        experiment.check(c)
