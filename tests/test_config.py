"""LlamaConfig: Meta's sizes, parameter counts, serialization and clear errors."""

import flax.linen as nn
import jax
import numpy as np
import pytest

import llamax
from llamax.convert import meta
from llamax.model import abstract_params

# Exact parameter counts of Meta's released checkpoints.
COUNTS = {"llama2-7b": 6_738_415_616, "llama2-13b": 13_015_864_320, "llama2-70b": 68_976_648_192}
FFN = {"llama2-7b": 11008, "llama2-13b": 13824, "llama2-70b": 28672}


@pytest.mark.parametrize("preset", sorted(COUNTS))
def test_full_size_parameter_counts(preset):
    config = llamax.LlamaConfig.preset(preset)
    abstract = abstract_params(llamax.Llama(config))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(abstract)))
    assert count == COUNTS[preset] == config.num_params()
    assert config.hidden_dim == FFN[preset]
    assert config.max_seq_len == 4096 and config.vocab_size == 32000


def test_70b_layout():
    config = llamax.LlamaConfig.preset("llama2-70b")
    assert (config.n_heads, config.kv_heads, config.head_dim) == (64, 8, 128)


def test_meta_params_json():
    meta_70b = {
        "dim": 8192,
        "multiple_of": 4096,
        "ffn_dim_multiplier": 1.3,
        "n_heads": 64,
        "n_kv_heads": 8,
        "n_layers": 80,
        "norm_eps": 1e-05,
        "vocab_size": -1,
    }
    config = meta.config_from_params(meta_70b, vocab_size=32000)
    assert config == llamax.LlamaConfig.preset("llama2-70b")
    assert meta.params_json(config) == meta_70b
    with pytest.raises(ValueError, match="vocab_size -1"):
        meta.config_from_params(meta_70b)
    with pytest.raises(ValueError, match="Unknown key.*'n_expert'"):
        meta.config_from_params({**meta_70b, "n_expert": 8}, vocab_size=32000)


def test_json_round_trip_and_hashable():
    config = llamax.LlamaConfig.preset(
        "tiny", rope_scaling={"rope_type": "linear", "factor": 2.0}, norm_eps=1e-6
    )
    assert llamax.LlamaConfig.from_json(config.to_json()) == config
    assert hash(config) == hash(llamax.LlamaConfig.from_json(config.to_json()))
    jax.jit(lambda x, c: x * c.dim, static_argnums=1)(1.0, config)  # usable as a static arg


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_heads": 4, "n_kv_heads": 3}, r"n_heads \(4\) must be divisible by n_kv_heads \(3\)"),
        ({"dim": 60, "n_heads": 8}, r"dim \(60\) must be divisible by n_heads \(8\)"),
        ({"rope_scaling": {"rope_type": "magic"}}, "rope_scaling type must be one of"),
        ({"rope_scaling": {"rope_type": "linear"}}, "needs a positive factor"),
        ({"rope_scaling": {"rope_type": "linear", "factor": float("inf")}}, "positive factor"),
        ({"n_layers": 0}, "n_layers must be a positive integer"),
        ({"n_layers": True}, "n_layers must be a positive integer"),
        ({"norm_eps": float("nan")}, "norm_eps must be a finite positive number"),
        ({"norm_eps": -1.0}, "norm_eps must be a finite positive number"),
        ({"rope_theta": float("inf")}, "rope_theta must be a finite positive number"),
        ({"ffn_dim_multiplier": 0.0}, "ffn_dim_multiplier must be a finite positive number"),
    ],
)
def test_invalid_configs_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        llamax.LlamaConfig.preset("tiny", **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dtype": "float8"}, "dtype must be one of"),
        ({"param_dtype": "int8"}, "param_dtype must be one of"),
        ({"remat_policy": "everything"}, "remat_policy must be one of"),
        ({"attention": "flash"}, "attention must be one of"),
        ({"scan_unroll": 0}, "scan_unroll must be a positive integer"),
        ({"loss_chunk_len": -1}, "loss_chunk_len must be an integer >= 0"),
    ],
)
def test_invalid_execution_names_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        llamax.Execution(**kwargs)
    with pytest.raises(ValueError, match=r"Unknown Execution field\(s\): \['remat'\]"):
        llamax.Execution().replace(remat="full")


def test_the_architecture_holds_no_execution_settings():
    """What a checkpoint records is the architecture only; the settings of how a model runs
    are not LlamaConfig fields, and old config.json files that recorded them still load."""
    config = llamax.LlamaConfig.preset("tiny")
    assert not set(config.to_dict()) & set(llamax.execution.FIELDS)
    with pytest.raises(ValueError, match="Unknown LlamaConfig field"):
        config.replace(attention="splash")
    old = {**config.to_dict(), "dtype": "bfloat16", "attention": "splash", "remat_policy": "full",
           "scan_unroll": 2, "param_dtype": "float32", "attention_block_q": 256,
           "attention_chunk": 512}  # fmt: skip
    assert llamax.LlamaConfig.from_dict(old) == config


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="Unknown preset 'llama2-8b'"):
        llamax.LlamaConfig.preset("llama2-8b")
    with pytest.raises(ValueError, match=r"Unknown LlamaConfig field\(s\): \['n_head'\]"):
        llamax.LlamaConfig.preset("tiny", n_head=4)
    with pytest.raises(ValueError, match=r"Unknown LlamaConfig key\(s\): \['hidden_size'\]"):
        llamax.LlamaConfig.from_dict({"hidden_size": 4})
