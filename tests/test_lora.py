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
from llamax import quantization as quantization_lib
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
    _, adapters = lora_lib.split(
        _unbox(llamax.model.abstract_params(llamax.Llama(CONFIG, lora=lora)))
    )
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


def test_the_adapters_gradient_is_the_chain_rule_of_the_weights(rng):
    """At B = 0 the gradient of B is s A^T dL/dW (W's gradient in the plain model) for every
    target, layers stacked: the adapters are wired into each matrix as LoRA's update, and A's
    gradient is 0 there."""
    lora = LoraConfig(rank=4, alpha=8, targets=ALL)
    model = llamax.Llama(CONFIG, lora=lora)
    init = _unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    base, adapters = lora_lib.split(init)
    tokens = rng.integers(0, CONFIG.vocab_size, (2, 12), dtype=np.int32)

    def loss(params, m):
        return jax.nn.log_softmax(m.apply({"params": params}, tokens))[..., 3].sum()

    weights = jax.grad(loss)(base, llamax.Llama(CONFIG))["layers"]
    grads = jax.grad(lambda a: loss(lora_lib.combine(base, a), model))(adapters)["layers"]
    for target in ALL:
        module = peft_lib.MODULES[target][0]
        w, a = weights[module][target], adapters["layers"][module][f"{target}_lora_a"]
        n_in = quantization_lib.AXES[target][0]
        flat_w = w.reshape(CONFIG.n_layers, int(np.prod(w.shape[1 : 1 + n_in])), -1)
        want = lora.scale * jnp.einsum("lir,lio->lro", a.reshape(CONFIG.n_layers, -1, 4), flat_w)
        got = grads[module][f"{target}_lora_b"]
        np.testing.assert_allclose(got.reshape(want.shape), want, atol=1e-5, rtol=1e-4)
        assert not np.any(grads[module][f"{target}_lora_a"])


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
def test_a_lora_run_loads_merged_and_converts_to_hf_and_peft(
    base_run, lora_run, base_step_loss, tmp_path, rng, capsys
):
    """llamax-generate/-eval's loader merges a LoRA run's adapters into its base; the run
    converts to a merged Hugging Face model and to PEFT adapters that `peft` loads on the
    converted base, all with the same logits; PEFT adapters merge back into a llamax
    checkpoint; a base plus adapters (PEFT's, or the run's) loads as the merged model."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from llamax import convert, loading, pretrained

    model, merged = loading.load_pretrained(lora_run)
    assert model.lora is None
    _, base = loading.load_pretrained(base_run)
    adapters, lora, base_path = pretrained.run_adapters(lora_run)
    assert base_path == base_run and lora.targets == ("wq", "wv", "w2") and lora.rank == 4
    tokens = rng.integers(0, model.config.vocab_size, (2, 16), dtype=np.int32)
    unmerged = llamax.Llama(model.config, lora=lora).apply(
        {"params": lora_lib.combine(base, adapters)}, tokens
    )
    np.testing.assert_allclose(model.apply({"params": merged}, tokens), unmerged, atol=1e-4)

    out = {name: str(tmp_path / name) for name in ("hf_base", "hf_merged", "peft", "back")}
    convert.convert("llamax", "hf", base_run, out["hf_base"])
    convert.convert("llamax", "hf", lora_run, out["hf_merged"])
    convert.convert("llamax", "peft", lora_run, out["peft"], base_name=out["hf_base"])
    hf = LlamaForCausalLM.from_pretrained(out["hf_base"], dtype="float32")
    with_adapters = hf_logits(PeftModel.from_pretrained(hf, out["peft"]).eval(), tokens)
    np.testing.assert_allclose(with_adapters, unmerged, atol=1e-4)
    hf_merged = LlamaForCausalLM.from_pretrained(out["hf_merged"], dtype="float32").eval()
    np.testing.assert_allclose(hf_logits(hf_merged, tokens), unmerged, atol=1e-4)

    convert.convert("peft", "llamax", out["peft"], out["back"], base=base_run)
    back_model, back = loading.load_pretrained(out["back"])
    np.testing.assert_allclose(back_model.apply({"params": back}, tokens), unmerged, atol=1e-4)
    with pytest.raises(ValueError, match="needs --base"):
        convert.convert("peft", "llamax", out["peft"], str(tmp_path / "x"))
    with pytest.raises(ValueError, match="not the workdir of a LoRA run"):
        convert.convert("llamax", "peft", base_run, str(tmp_path / "y"))

    # --adapters of llamax-generate and llamax-eval: PEFT's directory or the run, on the base.
    for adapters in (out["peft"], lora_run):
        loaded, params = loading.load_pretrained(base_run, adapters=adapters)
        np.testing.assert_allclose(loaded.apply({"params": params}, tokens), unmerged, atol=1e-4)
    with pytest.raises(ValueError, match="is a LoRA run .*give its base as the checkpoint"):
        loading.load_pretrained(lora_run, adapters=out["peft"])
    with pytest.raises(ValueError, match="neither a PEFT adapter directory"):
        loading.load_pretrained(base_run, adapters=out["hf_base"])
    with pytest.raises(ValueError, match="adapters only fit the base they were trained on"):
        loading.load_pretrained(base_step_loss[1], adapters=lora_run)
    from llamax.cli import eval as eval_cli
    from llamax.cli import generate

    missing = str(tmp_path / "nothing")
    capsys.readouterr()
    assert generate.main(["--checkpoint", base_run, "--adapters", missing, "--prompt", "x"]) == 2
    assert eval_cli.main(["passkey", "--checkpoint", base_run, "--adapters", missing,
                          "--lengths", "64", "--output", str(tmp_path / "e")]) == 2  # fmt: skip
    assert capsys.readouterr().err.count(f"adapters: no directory at {missing}") == 2


def _init(model, seed):
    init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 4), jnp.int32))["params"])
    return _unbox(init(jax.random.key(seed)))


@pytest.fixture(scope="module")
def base():
    """A random plain model's parameters."""
    return _init(llamax.Llama(CONFIG), 1)


quantize = jax.jit(quantization_lib.quantize, static_argnums=1)  # eagerly, op by op: seconds


def test_int8_quantization_is_per_channel_absmax(base):
    quantized = quantize(base, "int8")
    attention = quantized["layers"]["attention"]
    assert attention["wq"].dtype == jnp.int8 and attention["wq_scale"].shape == (2, 4, 16)
    assert attention["wo_scale"].shape == (2, 64)  # wo is [L, N, H, D]: one scale per D
    assert quantized["tok_embeddings"].dtype == base["tok_embeddings"].dtype  # not a matrix
    for name in ("wq", "wo"):
        w = np.asarray(base["layers"]["attention"][name])
        back = quantization_lib.dequantize(attention[name], attention[f"{name}_scale"], name)
        inputs = (1,) if name == "wq" else (1, 2)
        scale = np.expand_dims(np.asarray(attention[f"{name}_scale"]), inputs)
        assert np.all(np.abs(np.asarray(back) - w) <= scale / 2 + 1e-7)
        assert np.abs(np.asarray(attention[name])).max() == 127


NF4 = np.asarray(quantization_lib.NF4, np.float32)


def test_nf4_codes_are_qloras_normal_float_quantiles():
    """QLoRA's construction (Dettmers et al. 2023, section 3; bitsandbytes' create_normal_map):
    8 quantiles of N(0, 1) at evenly spaced probabilities from 1 - delta down to 1/2 for the
    positive half and 7 for the negative one, delta = (1/30 + 1/32) / 2, with an exact 0, over
    the largest."""
    from scipy.stats import norm

    top = 1 - (1 / 30 + 1 / 32) / 2
    positive = norm.ppf(np.linspace(top, 0.5, 9)[:-1])
    negative = -norm.ppf(np.linspace(top, 0.5, 8)[:-1])
    want = np.sort(np.concatenate([negative, [0.0], positive])) / positive.max()
    assert len(quantization_lib.NF4) == 16 and quantization_lib.NF4[7] == 0.0
    np.testing.assert_allclose(quantization_lib.NF4, want, rtol=0, atol=1e-6)
    assert all(float(np.float32(v)) == v for v in quantization_lib.NF4)  # float32 values, as stored


def test_nf4_rounds_at_bitsandbytes_thresholds():
    """bitsandbytes' dQuantizeNF4 (csrc/kernels.cu) gives code k + 1 to x > t_k (float32
    literals): a value on a threshold takes the lower code, the next float up the higher."""
    thresholds = np.float32(
        [
            -0.8480964004993439,
            -0.6106329262256622,
            -0.4599952697753906,
            -0.33967943489551544,
            -0.23460740596055984,
            -0.13791173323988914,
            -0.045525018125772476,
            0.03979014977812767,
            0.1202552504837513,
            0.2035212516784668,
            0.2920137718319893,
            0.3893125355243683,
            0.5016634166240692,
            0.6427869200706482,
            0.8614784181118011,
        ]
    )
    above = np.nextafter(thresholds, np.float32(2))
    w = np.concatenate([[1.0], thresholds, above, np.zeros(33)]).astype(np.float32)[:, None]
    q, absmax = quantization_lib.quantize_matrix(w, "w1", "nf4")
    assert absmax[0, 0] == 1.0
    codes = np.stack([np.asarray(q) >> 4, np.asarray(q) & 15], axis=1).reshape(-1)
    np.testing.assert_array_equal(codes[1:16], np.arange(15))
    np.testing.assert_array_equal(codes[16:31], np.arange(1, 16))


def nf4_reference(w, name):
    """NumPy NF4 of matrix `name`: each output channel's inputs (row-major over the input
    axes) in blocks of 64, each value the nearest code to value / block absmax (the lower on a
    tie), codes packed in pairs of neighbouring inputs, the first in the high nibble. Returns
    (packed, absmax, dequantized)."""
    n_in, n_out = quantization_lib.AXES[name]
    lead = w.ndim - n_in - n_out
    out = w.shape[lead + n_in :]
    blocks = w.reshape(*w.shape[:lead], -1, 64, *out)
    absmax = np.abs(blocks).max(axis=lead + 1)
    x = blocks / np.expand_dims(np.where(absmax > 0, absmax, 1), lead + 1)
    codes = np.argmin(np.abs(x[..., None] - NF4), axis=-1)  # the first of equal distances
    dequantized = (NF4[codes] * np.expand_dims(absmax, lead + 1)).reshape(w.shape)
    codes = codes.reshape(w.shape).astype(np.uint8)
    last = lead + n_in - 1
    packed = (np.take(codes, range(0, w.shape[last], 2), axis=last) << 4) | np.take(
        codes, range(1, w.shape[last], 2), axis=last
    )
    return packed, absmax, dequantized


def test_nf4_quantization_is_blockwise_normal_float(base):
    quantized = quantize(base, "nf4")
    attention, mlp = quantized["layers"]["attention"], quantized["layers"]["feed_forward"]
    # Two codes a byte along the last input axis; an absmax per 64 inputs of an output channel.
    assert attention["wq"].dtype == jnp.uint8 and attention["wq"].shape == (2, 32, 4, 16)
    assert attention["wq_scale"].dtype == jnp.float32
    assert attention["wq_scale"].shape == (2, 1, 4, 16)
    assert attention["wo"].shape == (2, 4, 8, 64) and attention["wo_scale"].shape == (2, 1, 64)
    assert mlp["w2"].shape == (2, 96, 64) and mlp["w2_scale"].shape == (2, 3, 64)
    assert quantized["tok_embeddings"].dtype == base["tok_embeddings"].dtype  # not a matrix
    half_gap = np.diff(NF4).max() / 2
    for group, name in [("attention", "wq"), ("attention", "wo"), ("feed_forward", "w2")]:
        w = np.asarray(base["layers"][group][name])
        q, absmax = quantized["layers"][group][name], quantized["layers"][group][f"{name}_scale"]
        want_q, want_absmax, want_back = nf4_reference(w, name)
        np.testing.assert_array_equal(q, want_q)
        np.testing.assert_array_equal(absmax, want_absmax)
        back = np.asarray(quantization_lib.dequantize(q, absmax, name))
        np.testing.assert_array_equal(back, want_back)
        # Within half the largest gap between codes, times the block's absmax.
        bound = np.repeat(want_absmax, 64, axis=1).reshape(w.shape) * half_gap
        assert np.all(np.abs(back - w) <= bound * (1 + 1e-6))
        assert np.abs(back - w).max() > 0.2 * bound.max()  # rounded, not stored

    # One layer's matrix too (no leading layer axis), and a block of zeros.
    w = np.asarray(base["layers"]["feed_forward"]["w1"][0]).copy()
    w[:64, 5] = 0.0
    q, absmax = quantization_lib.quantize_matrix(w, "w1", "nf4")
    want_q, want_absmax, want_back = nf4_reference(w, "w1")
    np.testing.assert_array_equal(q, want_q)
    np.testing.assert_array_equal(absmax, want_absmax)
    np.testing.assert_array_equal(quantization_lib.dequantize(q, absmax, "w1"), want_back)
    assert absmax[0, 5] == 0 and not np.any(want_back[:64, 5])


def test_nf4_packs_every_pair_of_codes():
    """Inputs 2k and 2k+1 hold codes k // 16 and k % 16 (every block has -1 and 1, so its absmax
    is 1): the 256 bytes are 0..255 in order, and they dequantize to exactly the inputs."""
    k = np.arange(256)
    w = np.stack([NF4[k // 16], NF4[k % 16]], axis=1).reshape(512, 1)
    w = np.concatenate([w, 3 * w], axis=1)  # and a second channel of another scale
    q, absmax = quantization_lib.quantize_matrix(w, "w2", "nf4")
    assert q.dtype == jnp.uint8 and q.shape == (256, 2)
    np.testing.assert_array_equal(q[:, 0], k)
    np.testing.assert_array_equal(absmax, [[1.0, 3.0]] * 8)
    np.testing.assert_array_equal(quantization_lib.dequantize(q, absmax, "w2"), w)


def test_nf4_needs_inputs_in_whole_blocks():
    odd = llamax.LlamaConfig.preset("tiny", n_layers=1, dim=96, n_heads=6, n_kv_heads=2)
    model = llamax.Llama(odd, llamax.Execution(weight_quantization="nf4"))
    with pytest.raises(
        ValueError, match=r"matrix wq \[96, 6, 16\] has 96 inputs .* multiple of 64"
    ):
        llamax.model.abstract_params(model)
    with pytest.raises(ValueError, match="matrix w2"):
        quantization_lib.quantize_matrix(jnp.ones((100, 64)), "w2", "nf4")
    with pytest.raises(
        ValueError, match=r"weight_quantization must be one of \('none', 'int8', 'nf4'\)"
    ):
        llamax.Execution(weight_quantization="int4")


@pytest.mark.parametrize("quantization", quantization_lib.QUANTIZATIONS)
def test_a_quantized_base_computes_with_its_dequantized_weights(quantization, base, rng):
    """The quantized model's logits are the plain model's on the dequantized weights; the
    model declares what `quantize` makes; LoRA's step 0 on the quantized base is that base
    exactly, and its merge (dequantized, then W + s A B) gives the unmerged logits."""
    quantized = quantize(base, quantization)
    execution = llamax.Execution(weight_quantization=quantization)
    model = llamax.Llama(CONFIG, execution)
    declared = _unbox(llamax.model.abstract_params(model))
    shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
    assert shapes(declared) == shapes(quantized)
    tokens = rng.integers(0, CONFIG.vocab_size, (2, 12), dtype=np.int32)
    plain = llamax.Llama(CONFIG)

    def logits(model, params):
        return jax.jit(model.apply)({"params": params}, tokens)

    got = logits(model, quantized)
    dequantized = lora_lib.merge(quantized, LoraConfig())  # no adapters: dequantizes only
    assert set(dequantized["layers"]["attention"]) == {"wq", "wk", "wv", "wo"}
    np.testing.assert_array_equal(got, logits(plain, dequantized))
    assert np.abs(got - logits(plain, base)).max() > 1e-4

    lora = LoraConfig(rank=4, alpha=16, targets=ALL)
    adapted = llamax.Llama(CONFIG, execution, lora=lora)
    fresh = lora_lib.split(_init(adapted, 2))[1]
    np.testing.assert_array_equal(logits(adapted, lora_lib.combine(quantized, fresh)), got)

    params, _ = lora_params(lora, quantized)
    unmerged = logits(adapted, params)
    merged = logits(plain, lora_lib.merge(params, lora))
    np.testing.assert_allclose(merged, unmerged, atol=1e-4)
    assert np.abs(unmerged - got).max() > 1e-2  # the adapters change the logits


@pytest.mark.slow
@pytest.mark.parametrize("quantization", quantization_lib.QUANTIZATIONS)
def test_lora_on_a_quantized_base(quantization, base_run, base_step_loss, tmp_path):
    """A LoRA run on an int8 or nf4 base: the base held quantized, step 1's loss close to the
    float base's, the loss falling, the adapters trained, the quantized base bit for bit what
    quantizing the base gives, untouched by training."""
    from conftest import load_config

    from llamax import loading, pretrained, setup, train
    from llamax.metrics import read_metrics

    overrides = {**LORA_RUN, "lora.base_dtype": quantization, "train.eval_every": 0}
    c = load_config("tiny", **overrides)
    c.init_from = base_run
    s = setup.build(c, setup.make_mesh(c))
    attention = s.abstract.frozen["layers"]["attention"]
    dtype = {"int8": jnp.int8, "nf4": jnp.uint8}[quantization]
    assert attention["wq"].dtype == dtype and attention["wq_scale"].dtype == jnp.float32
    assert s.abstract.frozen["norm"]["scale"].dtype == jnp.bfloat16
    state = train.run(c, str(tmp_path / "run"))
    losses = [r["loss"] for r in read_metrics(str(tmp_path / "run"))]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    adapters, _, _ = pretrained.run_adapters(str(tmp_path / "run"))  # trained: B moved off zero
    assert np.abs(adapters["layers"]["attention"]["wq_lora_b"]).max() > 0
    # Step 1 is the quantized base's loss: close to the float base's.
    np.testing.assert_allclose(losses[0], base_step_loss[0], rtol=2e-2)

    # The base after training: bit for bit the base read from init_from and quantized.
    _, float_base = loading.load_pretrained(base_run)
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), lora_lib.split(float_base)[0])
    want = quantize(bf16, quantization)
    assert jax.tree.structure(state.frozen) == jax.tree.structure(want)
    jax.tree.map(np.testing.assert_array_equal, state.frozen, want)


@pytest.mark.parametrize(
    "overrides, message",
    [({"lora.rank": 4}, "set init_from"),
     ({"lora.rank": 4, "lora.targets": "wq,wx"}, "targets must be distinct names"),
     ({"lora.rank": 4, "lora.base_dtype": "int4"},
      r"lora.base_dtype must be one of \('float32', 'bfloat16', 'float16', 'int8', 'nf4'\)"),
     ({"lora.rank": -1}, "rank must be a positive integer")],
)  # fmt: skip
def test_bad_lora_settings_are_named(overrides, message):
    from conftest import load_config

    from llamax import experiment

    c = load_config("tiny", **overrides)
    with pytest.raises(ValueError, match=message):
        experiment.check(c)
