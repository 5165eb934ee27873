"""The state a run starts from: the workdir's latest checkpoint (resumed, with its data
position), else `init_from`'s parameters, else a fresh initialization; with LoRA, the frozen
base read from `init_from` (quantized on the mesh for an int8 or nf4 base) and what trains
beside the adapters; a reward model's new score head on a language model's body; the models a
task needs beside the trained one (`llamax.tasks.Beside`: DPO's reference); and what a
checkpoint records of the models it was trained with (`run_meta`), checked at every resume.

Everything is read onto the shardings of `llamax.setup.Setup`, never whole on one host.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial

import flax
import jax
import jax.numpy as jnp

from llamax import checkpoint, lora, pretrained, quantization, sharding
from llamax.model import abstract_params
from llamax.setup import Setup, frozen_abstract
from llamax.step import TrainState

log = logging.getLogger("llamax")


def restore_or_init(
    s: Setup, checkpoints: checkpoint.Checkpoints, data_iter
) -> tuple[TrainState, dict]:
    """(The state to train from, the restored checkpoint's meta ({} when none)): the workdir's
    latest checkpoint (`data_iter` set to its data position; the LoRA base and the models
    beside checked against what it recorded, then read again), else `init_from`'s
    parameters, else a fresh initialization."""
    latest = checkpoints.latest_step()
    if latest is not None:
        state, data_state, meta = checkpoints.restore(latest, s.abstract, s.shardings)
        check_recorded(s, meta)  # by content, before any of them is read
        data_iter.set_state(data_state)
        log.info("resuming from the checkpoint of step %d in %s", latest, checkpoints.directory)
        frozen = frozen_base(s)
        if frozen is not None:
            state = state.replace(frozen=frozen)
        return state.replace(beside=read_beside(s)), meta
    return initial(s), {}


def restore_or_init_other(s: Setup, checkpoints: checkpoint.Checkpoints, name: str,
                          meta: Mapping) -> TrainState:  # fmt: skip
    """The state of a model a run trains beside its own (PPO's value model; `s` its setup):
    the item `name` of the workdir's latest checkpoint (its LoRA base and the models beside
    it checked against what the checkpoint's `meta` recorded under `name`), else `initial`."""
    latest = checkpoints.latest_step()
    if latest is None:
        return initial(s)
    check_recorded(s, meta.get(name, {}))
    state = checkpoints.restore_other(latest, name, s.abstract, s.shardings)
    frozen = frozen_base(s)
    if frozen is not None:
        state = state.replace(frozen=frozen)
    return state.replace(beside=read_beside(s))


def initial(s: Setup) -> TrainState:
    """The state of a new run: `init_from`'s parameters (a LoRA run: fresh adapters on its
    frozen base), else a fresh initialization; the models beside read."""
    frozen = frozen_base(s)
    rng = jax.random.key(s.c.train.seed)
    if frozen is not None:
        log.info("LoRA adapters (%s) on the frozen base %s", s.model.lora, s.c.init_from)
        start = trained_from_init(s)
        return s.init_state(rng, frozen=frozen, start=start, beside=read_beside(s))
    if not s.c.init_from:
        return s.init_state(rng, beside=read_beside(s))
    params, from_step = pretrained_params(s, rng)
    log.info("initialized from the parameters of %s (step %d)", s.c.init_from, from_step)
    return s.init_state(rng, params, beside=read_beside(s))


def read_beside(s: Setup) -> dict:
    """The parameters of the models the task needs beside the trained one, by name, each read
    from its checkpoint (`init_from` for DPO's reference: read again, never the trained
    parameters' buffers, which each step donates)."""
    out = {}
    for name, b in s.task.beside(s.c).items():
        out[name], _ = pretrained.restore_params(
            b.path(s.c), s.abstract.beside[name], s.shardings.beside[name], b.key
        )
    return out


def run_meta(s: Setup) -> dict:
    """What a checkpoint records about how its parameters relate to other models: a LoRA
    run's base (`lora_base`), and each model beside the trained one under its `meta` entry
    (a DPO run's `dpo_reference`): their path, step and content
    (`pretrained.base_fingerprint`), so that a resume notices another model put in their
    place."""
    meta = {}
    if s.abstract.frozen is not None:
        meta["lora_base"] = pretrained.base_fingerprint(s.c.init_from)
    for b in s.task.beside(s.c).values():
        meta[b.meta] = pretrained.base_fingerprint(b.path(s.c), b.key)
    return meta


def check_recorded(s: Setup, meta: Mapping) -> None:
    """A resumed run meets the models its checkpoint recorded (`run_meta`): the LoRA base and
    each model beside, by content (`pretrained.check_same_base`)."""
    if s.abstract.frozen is not None:
        pretrained.check_same_base(meta.get("lora_base"), s.c.init_from)
    for b in s.task.beside(s.c).values():
        pretrained.check_same_base(meta.get(b.meta), b.path(s.c), b.key, b.what, b.rule)


def new_head(s: Setup) -> bool:
    """A reward model started from a language model's checkpoint (as Llama 2's start from
    their chat models): the body is read from it, the score head is new (initialized as the
    model initializes it: the first scores near 0)."""
    saved = pretrained.saved_params(s.c.init_from, "init_from")
    new = s.model.config.head == "score" and "score" not in saved and "output" in saved
    if new:
        log.info("a reward model on the language model %s: its body, a new score head",
                 s.c.init_from)  # fmt: skip
    return new


def pretrained_params(s: Setup, rng: jax.Array):
    """(`init_from`'s parameters on their shardings, its step); a reward model's new score
    head on a language model's body (`new_head`)."""
    init_from = s.c.init_from
    if not new_head(s):
        return pretrained.restore_params(
            init_from, s.abstract.params, s.shardings.params, what="init_from"
        )
    body = {k: v for k, v in s.abstract.params.items() if k != "score"}
    shardings = {k: v for k, v in s.shardings.params.items() if k != "score"}
    params, from_step = pretrained.restore_params(
        init_from, body, shardings, "init_from", partial=True
    )

    def score(r):
        zeros = jnp.zeros((1, 1), jnp.int32)
        return flax.linen.unbox(s.model.init(r, zeros)["params"])["score"]

    params["score"] = jax.jit(score, out_shardings=s.shardings.params["score"])(rng)
    return params, from_step


def trained_from_init(s: Setup):
    """With LoRA, `init_from`'s values of the parameters that train beside the adapters (a
    reward model's score head, when `init_from` is a reward model), or None: they start
    fresh (none there, or a new head on a language model's body: `new_head`)."""
    beside, _ = lora.split(s.abstract.params)  # what trains, less the adapters
    if not beside or new_head(s):
        return None
    shardings, _ = lora.split(s.shardings.params)
    start, _ = pretrained.restore_params(
        s.c.init_from, beside, shardings, "init_from", partial=True
    )
    log.info("%s trained beside the adapters from %s", sorted(beside), s.c.init_from)
    return start


def frozen_base(s: Setup):
    """LoRA's base, read from `init_from` onto its shardings (None without LoRA): every
    parameter but those that train (a reward model's base: the body, without whichever head
    `init_from` has)."""
    if s.abstract.frozen is None:
        return None
    if s.model.execution.weight_quantization == "none":
        base, _ = pretrained.restore_params(
            s.c.init_from, s.abstract.frozen, s.shardings.frozen, "init_from", partial=True
        )
        return base
    # Quantized: read as the float weights the checkpoint holds (in bfloat16), then
    # quantized on the mesh one matrix at a time, each float matrix let go once quantized
    # (so that the float base and the quantized one never exist whole at once).
    kind = s.model.execution.weight_quantization
    plain = s.model.clone(execution=s.model.execution.replace(weight_quantization="none"))
    boxed = lora.split(abstract_params(plain), s.trained_whole)[0]
    base, _ = pretrained.restore_params(
        s.c.init_from, frozen_abstract(boxed, "bfloat16"),
        sharding.tree_shardings(boxed, s.mesh), what="init_from", partial=True,
    )  # fmt: skip

    def visit(tree, shardings):  # empties `tree` (the restored dicts) as it goes
        out = {}
        while tree:
            name, value = tree.popitem()
            if isinstance(value, Mapping):
                out[name] = visit(value, shardings[name])
            elif name in quantization.AXES:
                quantize = jax.jit(
                    partial(quantization.quantize_matrix, name=name, quantization=kind),
                    out_shardings=(shardings[name], shardings[f"{name}_scale"]),
                )
                out[name], out[f"{name}_scale"] = quantize(value)
            else:
                out[name] = value
            del value
        return out

    with sharding.use_mesh(s.mesh):
        return visit(base, s.shardings.frozen)
