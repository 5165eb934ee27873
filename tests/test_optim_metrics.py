"""The optimizer against a hand-written AdamW, the schedule, FLOPs and MFU accounting."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from llamax import LlamaConfig, metrics, optim


def test_default_schedule_is_llama2s():
    """The paper's schedule (section 2.2): 2,000 linear warmup steps to the peak (7B: 3e-4),
    then cosine decay to 10% of it at the last step."""
    lr = optim.learning_rate_schedule(optim.default_config(), total_steps=22_000)
    assert float(lr(0)) == 0.0
    assert float(lr(1000)) == pytest.approx(1.5e-4)
    assert float(lr(2000)) == pytest.approx(3e-4)
    assert float(lr(12_000)) == pytest.approx(3e-5 + 0.5 * (3e-4 - 3e-5), rel=1e-5)  # midpoint
    assert float(lr(22_000)) == pytest.approx(3e-5)


def test_default_adamw_steps_equal_the_papers_formula():
    """Two steps of the default optimizer (warmup off, so that it moves) against Llama 2's
    AdamW written out in float64: clipping to norm 1.0 (the first gradient is clipped, the
    second is not), beta1 0.9, beta2 0.95, eps 1e-5, decoupled weight decay 0.1, and norms
    ('.../scale') excluded from decay by the default mask."""
    c = optim.default_config()
    c.warmup_steps = 0
    tx = optim.make_optimizer(c, total_steps=10)
    lr_at = optim.learning_rate_schedule(c, 10)
    rng = np.random.default_rng(0)
    shapes, decay = {"w": (3, 4), "norm/scale": (4,)}, {"w": 0.1, "norm/scale": 0.0}

    def nest(flat):
        return {"w": flat["w"], "norm": {"scale": flat["norm/scale"]}}

    ref = {k: rng.normal(size=s) for k, s in shapes.items()}  # float64 reference
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), nest(ref))
    state = tx.init(params)
    m = {k: np.zeros(s) for k, s in shapes.items()}
    v = {k: np.zeros(s) for k, s in shapes.items()}
    for step, scale in enumerate((30.0, 0.1)):
        grads = {k: scale * rng.normal(size=s) for k, s in shapes.items()}
        updates, state = tx.update(jax.tree.map(jnp.asarray, nest(grads)), state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)

        clip = min(1.0, 1.0 / np.sqrt(sum((g**2).sum() for g in grads.values())))
        assert (clip < 1.0) == (step == 0)
        t, lr = step + 1, float(lr_at(step))
        for k, g in grads.items():
            m[k] = 0.9 * m[k] + 0.1 * g * clip
            v[k] = 0.95 * v[k] + 0.05 * (g * clip) ** 2
            mhat, vhat = m[k] / (1 - 0.9**t), v[k] / (1 - 0.95**t)
            ref[k] = ref[k] - lr * (mhat / (np.sqrt(vhat) + 1e-5) + decay[k] * ref[k])
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(nest(ref)), strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)


def test_weight_decay_mask():
    params = {"layers": {"attention_norm": {"scale": 0}, "attention": {"wq": 0}}, "output": 0}
    assert optim.weight_decay_mask(params, "norm") == {
        "layers": {"attention_norm": {"scale": False}, "attention": {"wq": True}},
        "output": True,
    }
    assert all(jax.tree.leaves(optim.weight_decay_mask(params, "")))


def test_flops_per_token_7b():
    """MaxText's accounting: 6 * (non-embedding matmul params + V * D) + 6 * L * T * D."""
    c = LlamaConfig.preset("llama2-7b")
    matmul = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 32000 * 4096
    assert metrics.flops_per_token(c, 4096) == 6 * matmul + 6 * 32 * 4096 * 4096
    assert metrics.flops_per_token(c, 4096) / 1e9 == pytest.approx(42.9, abs=0.05)
    # One forward pass is 2 FLOPs per multiply-accumulate: DPO's step adds the reference's.
    assert metrics.flops_per_token(c, 4096, forwards=1) == 2 * matmul + 2 * 32 * 4096 * 4096
    assert metrics.flops_per_token(c, 4096, forwards=4) == 8 * matmul + 8 * 32 * 4096 * 4096


def _dot_flops(jaxpr) -> float:
    """2 x the multiply-adds of every dot_general in `jaxpr` and the jaxprs inside it (a scan's
    body once per iteration): what a step computes in matrix products, counted from the
    program itself."""
    from jax.extend import core

    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += (
                2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)
            )
        times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, list | tuple) else [value]:
                if isinstance(sub, core.ClosedJaxpr | core.Jaxpr):
                    total += times * _dot_flops(getattr(sub, "jaxpr", sub))
    return total


@pytest.mark.parametrize("task, data", [("lm", "markov"), ("sft", "chat"), ("reward", "preference"),
                                        ("dpo", "preference")])  # fmt: skip
def test_a_tasks_flops_are_the_matrix_products_its_step_runs(task, data):
    """Each task's FLOPs per token (MFU's numerator) equal the dot products of its train step's
    program, counted from the jaxpr: a language model's 3 forwards, DPO's 4 (the reference's
    forward too), a reward model without the vocabulary projection. The program's attention is
    the reference's, over every key (masked), where the accounting counts the causal half."""
    from llamax import setup, sharding

    c = load_config("tiny", **{"task": task, "data.source": data, "model.dim": 256,
                               "model.n_layers": 2, "model.n_heads": 4, "model.vocab_size": 1024,
                               "train.seq_len": 128, "train.batch_size": 2, "mesh.fsdp": 1,
                               "train.grad_accum_steps": 2})  # fmt: skip
    # Model FLOPs, as MFU counts them: no recomputation (remat, the chunked loss's logits
    # computed again in the backward pass).
    c.model.loss_chunk_len = 0
    c.init_from = "unused"  # DPO's reference: only its shapes are traced
    mesh = setup.make_mesh(c, jax.devices()[:1])
    s = setup.build(c, mesh)
    with sharding.use_mesh(mesh):
        program = jax.make_jaxpr(s.train_step)(s.abstract_state(), s.abstract_batch())
    config, tokens, seq = s.model.config, 2 * 128, 128
    forwards = {"dpo": 4}.get(task, 3)
    whole_attention = forwards * 2 * config.n_layers * seq * config.dim  # the masked half
    want = (s.task.flops_per_token(s.c, config) + whole_attention) * tokens
    assert _dot_flops(program.jaxpr) == want


def test_70b_grouped_query_flops():
    c = LlamaConfig.preset("llama2-70b")
    attention = 8192 * 128 * (2 * 64 + 2 * 8)
    matmul = 80 * (attention + 3 * 8192 * 28672) + 32000 * 8192
    assert metrics.flops_per_token(c, 4096) == 6 * matmul + 6 * 80 * 4096 * 8192


class _Device:
    def __init__(self, kind):
        self.device_kind = kind


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5p", 459e12),
        ("TPU v6 lite", 918e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA B200", 2250e12),
        ("cpu", None),
    ],
)
def test_peak_flops_lookup(kind, peak):
    assert metrics.peak_flops_per_device(_Device(kind)) == peak
    assert metrics.peak_flops_per_device(_Device(kind), override=1e12) == 1e12
