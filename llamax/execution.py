"""How a model computes, apart from what it is: compute and storage dtypes, the attention
backend and its blocks, rematerialization, and how the layers are looped.

A checkpoint records the architecture only (`LlamaConfig`); these settings belong to the run
that uses it. A model trained on TPU with splash attention loads on a GPU or CPU with that
platform's kernel, and two checkpoints of the same weights do not differ by how they were
trained. Training takes them from the experiment config's `model` section; `load_pretrained`,
`llamax-generate` and `llamax-eval` default to `attention="auto"` (the platform's fused kernel
where the shapes allow it) and take overrides.

Each setting's allowed values are registered once, here or next to the code that uses them
(`llamax.attention.BACKENDS`), and checked when an `Execution` is made.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llamax import attention, quantization

# Floating-point dtypes for computation and parameter storage.
DTYPES = ("float32", "bfloat16", "float16")
# How the layers' matrices may be stored: "none" (param_dtype) or a format of
# llamax.quantization.
QUANTIZATIONS = ("none", *quantization.QUANTIZATIONS)
# What `nn.remat` saves inside a layer for the backward pass ("none": no remat at all).
# "none" runs the layers without remat; "full" saves only each layer's input (jax's default).
REMAT_POLICIES = {
    "none": None,
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj"
    ),
}


@dataclasses.dataclass(frozen=True)
class Execution:
    dtype: str = "float32"  # activations and matmuls
    param_dtype: str = "float32"  # parameters as initialized and stored (the master weights)
    remat_policy: str = "none"  # one of REMAT_POLICIES
    # Layers stacked on a leading axis and run by `nn.scan` (training, one compiled layer), or
    # separate per-layer parameters run by a Python loop (generation: slicing a layer out of
    # stacked weights and caches copies it on every decode step).
    scan_layers: bool = True
    # Layers per iteration of the layer scan. Unrolling lets XLA fuse across layers (faster
    # steps on CPU, docs/performance.md) and costs compile time; the parameters are the same.
    scan_unroll: int = 1
    # One of llamax.attention.BACKENDS; `auto`: the platform's fused kernel where the shapes
    # allow it (splash on TPU, cuDNN on GPU), the reference `xla` on CPU.
    attention: str = "auto"
    # Queries and keys per block of the chunked and splash attention.
    attention_block_q: int = 512
    attention_block_kv: int = 512
    # Documents per packed row that cuDNN's packed layout takes in one call; a batch with a
    # row of more gets a dense mask for that call (the same result, slower).
    attention_max_segments: int = 32
    # Positions of every sequence whose logits a training loss computes at once: for longer
    # sequences the output projection and the cross-entropy run chunk by chunk in a loop
    # (forward, then again in the backward pass), so that the logits [B, T, V], the largest
    # activation, are never whole in memory; 0: always the whole sequence at once.
    loss_chunk_len: int = 512
    # How the layers' matrices (wq ... w3) are stored: "none" (param_dtype), "int8" with a
    # float32 scale per output channel, or "nf4" (4-bit NormalFloat, two codes a byte) with a
    # float32 absmax per 64 inputs of an output channel; dequantized inside each layer to the
    # compute dtype (a frozen LoRA base; llamax.quantization.layout).
    weight_quantization: str = "none"

    def __post_init__(self):
        errors = []
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                errors.append(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        if self.remat_policy not in REMAT_POLICIES:
            errors.append(
                f"remat_policy must be one of {tuple(REMAT_POLICIES)}, got {self.remat_policy!r}"
            )
        chunk = self.loss_chunk_len
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
            errors.append(f"loss_chunk_len must be an integer >= 0, got {chunk!r}")
        positive = ("scan_unroll", "attention_block_q", "attention_block_kv",
                    "attention_max_segments")  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                errors.append(f"{name} must be a positive integer, got {value!r}")
        if self.weight_quantization not in QUANTIZATIONS:
            errors.append(
                f"weight_quantization must be one of {QUANTIZATIONS}, got "
                f"{self.weight_quantization!r}"
            )
        if not errors:
            errors += attention.check_backend(
                self.attention, self.attention_block_q, self.attention_block_kv
            )
        if errors:
            raise ValueError("Invalid Execution: " + "; ".join(errors))

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> Execution:
        unknown = sorted(set(changes) - set(FIELDS))
        if unknown:
            raise ValueError(f"Unknown Execution field(s): {unknown}; known: {sorted(FIELDS)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = tuple(f.name for f in dataclasses.fields(Execution))

# Options of libtpu's XLA that the train and eval steps compile with for a TPU mesh, each
# chosen by a measurement in docs/tpu_fit.md:
# - `xla_jf_bf16_propagation` off. That pass lowers values to bfloat16 where it cannot change
#   a result; here it turns each layer's cast of its float32 weights, inside the layer loop,
#   into one bfloat16 copy of every layer's weights made before the loop and held through
#   the backward pass: half the float32 weights' own memory again (0.75 GiB per chip for 7B
#   on v5e-16, 4 GiB for 70B on v5p-64). Precision is unchanged by the pass's contract.
TPU_COMPILER_OPTIONS = {"xla_jf_bf16_propagation": False}


def compiler_options(platform: str) -> dict | None:
    """The XLA options llamax compiles its training steps with on `platform`."""
    return dict(TPU_COMPILER_OPTIONS) if platform == "tpu" else None
