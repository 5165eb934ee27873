"""Sharded forward passes equal the single-device one; full-size models shard fully."""

import inspect
import math

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import random_params
from jax.sharding import PartitionSpec as P

import llamax
from llamax import model as model_lib
from llamax import sharding

MODEL_AXES = {"batch", "length", "kv_length", "embed", "heads", "kv_heads", "head_dim", "mlp",
              "vocab", "layers", "lora_rank", "labels"}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_forward_equals_single_device(shape, rng):
    config = llamax.LlamaConfig.preset("tiny", n_heads=8, n_kv_heads=4)
    model = llamax.Llama(config)
    params = random_params(config)
    tokens = rng.integers(0, config.vocab_size, (8, 16), dtype=np.int32)
    segment_ids = np.repeat([[1] * 10 + [2] * 6], 8, axis=0)
    ref = np.asarray(model.apply({"params": params}, tokens, segment_ids=segment_ids))

    mesh = sharding.make_mesh(*shape)
    shardings = sharding.tree_shardings(model_lib.abstract_params(model), mesh)
    sharded = jax.device_put(params, shardings)
    with sharding.use_mesh(mesh):
        forward = jax.jit(lambda p, t, s: model.apply({"params": p}, t, segment_ids=s))
        logits = forward(sharded, tokens, segment_ids)
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-5, rtol=0)
    # The output keeps the constraint the model put on it: batch over data and fsdp, vocab
    # over tensor (size-1 mesh axes are not named).
    spec = logits.sharding.spec
    expected_batch = tuple(a for a, n in zip(("data", "fsdp"), shape[:2], strict=True) if n > 1)
    assert tuple(np.atleast_1d(spec[0] or ())) == expected_batch
    assert (spec[2] if len(spec) > 2 else None) == ("tensor" if shape[2] > 1 else None)


@pytest.mark.parametrize(
    "sizes, attention",
    [({"context": 8}, "xla"), ({"data": 2, "fsdp": 2, "context": 2}, "xla"),
     ({"fsdp": 2, "context": 2, "tensor": 2}, "chunked")],
)  # fmt: skip
def test_context_parallel_forward_equals_single_device(sizes, attention, rng):
    """Sequences split along their length over the mesh's context axis (packed documents
    crossing the split, causal attention over the whole sequence) give the logits of one
    device; the activations stay split."""
    config = llamax.LlamaConfig.preset("tiny", n_heads=8, n_kv_heads=4)
    run = llamax.Execution(attention=attention, attention_block_q=4)
    model = llamax.Llama(config, run)
    params = random_params(config)
    tokens = rng.integers(0, config.vocab_size, (8, 32), dtype=np.int32)
    segment_ids = np.repeat([[1] * 11 + [2] * 15 + [0] * 6], 8, axis=0)
    positions = np.concatenate([np.arange(11), np.arange(15), np.zeros(6, int)])[None]
    positions = np.repeat(positions, 8, axis=0).astype(np.int32)
    ref = np.asarray(llamax.Llama(config).apply({"params": params}, tokens, positions,
                                                segment_ids))  # fmt: skip
    mesh = sharding.make_mesh(**{"fsdp": 1, **sizes})
    shardings = sharding.tree_shardings(model_lib.abstract_params(model), mesh)
    batch = jax.sharding.NamedSharding(mesh, sharding.mesh_axes(("batch", "length"), (8, 32), mesh))
    with sharding.use_mesh(mesh):
        forward = jax.jit(lambda p, t, q, s: model.apply({"params": p}, t, q, s))
        logits = forward(jax.device_put(params, shardings), *(jax.device_put(x, batch)
                         for x in (tokens, positions, segment_ids)))  # fmt: skip
    valid = segment_ids > 0
    np.testing.assert_allclose(np.asarray(logits)[valid], ref[valid], atol=1e-5, rtol=0)
    assert logits.sharding.spec[1] == "context"


def test_context_axis_splits_activations_and_parameters_not_keys():
    mesh = sharding.make_mesh(fsdp=2, context=4)
    assert sharding.mesh_axes(("batch", "length", "embed"), (8, 16, 64), mesh) == P(
        "fsdp", "context", None
    )
    assert sharding.mesh_axes(("embed", "heads", "head_dim"), (64, 8, 16), mesh) == P(
        ("fsdp", "context"), None, None
    )
    assert sharding.mesh_axes(("batch", "kv_length", "kv_heads", "head_dim"), (8, 16, 4, 8),
                              mesh) == P("fsdp", None, None, None)  # fmt: skip


def test_params_born_sharded():
    config = llamax.LlamaConfig.preset("tiny")
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    params = model_lib.init_params(llamax.Llama(config), jax.random.key(0), mesh)
    wq = params["layers"]["attention"]["wq"]
    assert wq.sharding.spec == P(None, "fsdp", "tensor", None)
    # Each device holds a quarter of wq: fsdp halves embed, tensor halves heads.
    assert {s.data.shape for s in wq.addressable_shards} == {(2, 32, 2, 16)}
    assert params["tok_embeddings"].sharding.spec == P("tensor", "fsdp")


@pytest.mark.parametrize("preset", ["llama2-7b", "llama2-13b", "llama2-70b"])
def test_full_size_parameters_are_fully_sharded_under_fsdp(preset):
    """Every parameter over 1 MiB is split 8 ways under fsdp=8 (eval_shape: no memory used)."""
    mesh = sharding.make_mesh(fsdp=8)
    abstract = model_lib.abstract_params(llamax.Llama(llamax.LlamaConfig.preset(preset)))
    shardings = sharding.tree_shardings(abstract, mesh)
    total = per_device = 0
    for leaf, s in zip(
        jax.tree.leaves(nn.unbox(abstract)), jax.tree.leaves(shardings), strict=True
    ):
        nbytes = math.prod(leaf.shape) * leaf.dtype.itemsize
        shard = math.prod(s.shard_shape(leaf.shape)) * leaf.dtype.itemsize
        if nbytes > 2**20:
            assert shard * 8 == nbytes, f"{leaf.shape} is not split 8 ways: {s.spec}"
        total, per_device = total + nbytes, per_device + shard
    assert per_device <= total / 8 * 1.001


def test_rules_table_names_each_logical_axis_once():
    names = [name for name, _ in sharding.RULES]
    assert len(names) == len(set(names))
    assert set(names) == MODEL_AXES
    for _, axes in sharding.RULES:
        for axis in (axes,) if isinstance(axes, str) else axes or ():
            assert axis in sharding.MESH_AXES


def test_model_names_no_mesh_axes():
    source = inspect.getsource(model_lib)
    for axis in sharding.MESH_AXES:
        assert f'"{axis}"' not in source and f"'{axis}'" not in source


def test_every_parameter_has_logical_names():
    abstract = model_lib.abstract_params(llamax.Llama(llamax.LlamaConfig.preset("tiny")))
    for leaf in jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
        assert isinstance(leaf, nn.Partitioned)
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= MODEL_AXES


def test_make_mesh_sizes_and_errors():
    assert dict(sharding.make_mesh(data=2, fsdp=-1).shape) == {
        "data": 2,
        "fsdp": 4,
        "context": 1,
        "tensor": 1,
    }
    assert dict(sharding.make_mesh(fsdp=2, tensor=-1).shape) == {
        "data": 1,
        "fsdp": 2,
        "context": 1,
        "tensor": 4,
    }
    assert dict(sharding.make_mesh(fsdp=-1, context=4).shape)["fsdp"] == 2
    four = sharding.make_mesh(fsdp=-1, devices=jax.devices()[:4])
    assert four.devices.size == 4
    with pytest.raises(ValueError, match="needs 16 devices, but there are 8"):
        sharding.make_mesh(data=2, fsdp=8)
    with pytest.raises(ValueError, match="cannot be split"):
        sharding.make_mesh(data=3, fsdp=-1)
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.make_mesh(data=-1, fsdp=-1)


def test_axes_that_do_not_divide_are_dropped():
    mesh = sharding.make_mesh(fsdp=1, tensor=8)
    # 2 kv heads cannot split 8 ways: replicate them rather than fail.
    assert sharding.mesh_axes(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh) == P(
        None, None, None
    )
    assert sharding.mesh_axes(("embed", "heads", "head_dim"), (64, 8, 16), mesh) == P(
        None, "tensor", None
    )
    mesh = sharding.make_mesh(data=2, fsdp=4)
    assert sharding.mesh_axes(("batch", "length"), (2, 5), mesh) == P("data", None)
    assert sharding.mesh_axes(("batch", "length"), (8, 5), mesh) == P(("data", "fsdp"), None)
