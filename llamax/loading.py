"""Loading a model to run it: a checkpoint's weights on a mesh with the attention backend of
the platform (`load_pretrained`), LoRA adapters merged in (a PEFT adapter directory, or a
llamax LoRA run's workdir), its tokenizer (`load_with_tokenizer`), and the inference engine
on them (`load_engine`): what generation, evaluation, scoring and the notebooks start from.

It stands above both the reading of llamax checkpoints (`llamax.pretrained`) and the foreign
formats (`llamax.convert`, PEFT's among them), which both import the first and not this.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from llamax import fs, inference, lora, sharding
from llamax.config import LlamaConfig
from llamax.execution import Execution
from llamax.lora import LoraConfig
from llamax.model import Llama, abstract_params, trained_with_adapters
from llamax.pretrained import (
    check_run_base,
    check_shapes,
    lora_run,
    read_model_config,
    restore_params,
    run_adapters,
    saved_params,
)


def require_adapters_dir(path: str) -> None:
    """`FileNotFoundError` unless `path` (LoRA adapters: a PEFT directory or a run) is a
    directory: a check a command makes before anything is loaded."""
    if not fs.isdir(path):
        raise FileNotFoundError(f"adapters: no directory at {path}")


def read_adapters(path: str, config: LlamaConfig) -> tuple[dict, LoraConfig, LlamaConfig]:
    """LoRA adapters for a base of `config` (float32 numpy, layers stacked), their config, and
    the model they make of the base: a PEFT adapter directory (`adapter_config.json` +
    `adapter_model.safetensors`), or the workdir of a llamax LoRA run (its latest checkpoint);
    clear errors for anything else and for adapters of another model's shapes. The tree holds
    the parameters trained beside the adapters too (`model.trained_with_adapters`: a reward
    model's score head, PEFT's `modules_to_save`), and the model's head is the adapters' (a
    LoRA reward model on a language model's body is a reward model)."""
    from llamax.convert import peft

    if fs.exists(fs.join(path, peft.CONFIG_FILE)):
        tree, adapters_config = peft.import_adapters(path, config)
        return tree, adapters_config, peft.adapted_config(config, tree)
    require_adapters_dir(path)
    if lora_run(path) is None:
        raise ValueError(
            f"adapters: {path} is neither a PEFT adapter directory (no {peft.CONFIG_FILE}) "
            "nor the workdir of a llamax LoRA run (lora.rank > 0)"
        )
    adapters, adapters_config, _ = run_adapters(path)
    adapted = config.replace(head=read_model_config(path).head)
    want = lora.split(abstract_params(Llama(adapted, Execution(), adapters_config)),
                      trained_with_adapters(adapted))[1]  # fmt: skip
    check_shapes(adapters, nn.unbox(want), path)
    tree = jax.tree.map(lambda x: np.asarray(x, np.float32), adapters)
    return tree, adapters_config, adapted


def load_pretrained(
    path: str,
    dtype: str = "float32",
    mesh: jax.sharding.Mesh | None = None,
    adapters: str | None = None,
    **execution,
):
    """`(model, params)` from a converted checkpoint or a training run's workdir: the latest
    checkpoint's parameters, in their stored dtype, on `mesh` (default: one device), and the
    model computing in `dtype`. The attention backend is `auto` (the platform's fused kernel
    where it applies); `execution` overrides any `Execution` field (`attention="xla"`, ...).

    LoRA: `adapters` (a PEFT adapter directory or a LoRA run's workdir) are merged into the
    base `path`'s weights (W + s A B, in float32); a LoRA run's workdir given as `path` reads as
    its recorded base with its adapters. Adapters of a llamax run must meet the base they
    were trained on (its content: `check_same_base`). Adapters that trained a head beside
    them (a LoRA reward model's score head) bring it: the model has their head, its body read
    from the base (a language model's, without its output). Every checkpoint read is
    verified first (`verified`)."""
    adapted = lora_run(path)
    if adapted is not None:  # a LoRA run: its base, with the adapters merged in
        if adapters:
            raise ValueError(
                f"{path} is a LoRA run (adapters on the base {adapted[1]}): load it alone, or "
                "give its base as the checkpoint and the run as the adapters"
            )
        return load_pretrained(adapted[1], dtype, mesh, adapters=path, **execution)
    config = read_model_config(path)
    stored = np.dtype(jax.tree.leaves(saved_params(path))[0].dtype).name
    run = Execution(dtype=dtype, param_dtype=stored, attention="auto")
    mesh = mesh or sharding.make_mesh(devices=jax.devices()[:1])
    if not adapters:
        model = Llama(config, run.replace(**execution))
        boxed = abstract_params(model)
        params, _ = restore_params(path, nn.unbox(boxed), sharding.tree_shardings(boxed, mesh))
        return model, params
    tree, adapters_config, config = read_adapters(adapters, config)
    if lora_run(adapters) is not None:
        check_run_base(adapters, path)
    model = Llama(config, run.replace(**execution))
    # What trains beside the adapters and they bring (a PEFT adapter of a language model on
    # a reward model keeps the base's score head).
    trained = tuple(k for k in trained_with_adapters(config) if k in tree)
    base, boxed = lora.split(abstract_params(Llama(config, model.execution, adapters_config)),
                             trained)  # fmt: skip
    params, _ = restore_params(path, nn.unbox(base), sharding.tree_shardings(base, mesh),
                               partial=True)  # fmt: skip
    # What trained beside the adapters in the base's stored dtype, as the merged weights
    # will be (the adapters stay float32 until the merge).
    tree = {k: jax.tree.map(lambda x: x.astype(stored), v) if k in trained else v
            for k, v in tree.items()}  # fmt: skip
    tree = jax.device_put(tree, sharding.tree_shardings(boxed, mesh))
    return model, lora.merge(lora.combine(params, tree), adapters_config)


def load_with_tokenizer(
    path: str,
    tokenizer: str | None = None,
    dtype: str = "float32",
    adapters: str | None = None,
    head: str = "lm",
    **execution,
):
    """`(model, params, tokenizer)` for generating or evaluating with a checkpoint (and LoRA
    `adapters` merged in, as `load_pretrained`) and its tokenizer (`checkpoint_tokenizer`).
    The model must have the `head` the caller needs (`LlamaConfig.head`: "lm" to generate and
    evaluate, "score" to score)."""
    model, params = load_pretrained(path, dtype=dtype, adapters=adapters, **execution)
    if model.config.head != head:
        kinds = {"lm": "a language model", "score": "a reward model (a score head)"}
        what = f"{path} with the adapters {adapters}" if adapters else path
        raise ValueError(f"{what} is {kinds[model.config.head]}; this needs {kinds[head]}")
    loaded = checkpoint_tokenizer(path, tokenizer, model.config.vocab_size)
    return model, params, loaded


def load_engine(
    path: str,
    tokenizer: str | None = None,
    dtype: str = "float32",
    adapters: str | None = None,
    head: str = "lm",
    mesh: jax.sharding.Mesh | None = None,
    config: dict | None = None,
    **execution,
):
    """`(engine, tokenizer)`: the checkpoint at `path` loaded as `load_with_tokenizer` loads it
    (LoRA `adapters` merged in; the model must have the `head` the caller needs) and laid out
    once for inference (`llamax.inference.Engine`, on `mesh`; the loaded stacked weights are
    released as they are unstacked, so the weights are held once). `config`: fields of the
    model's `LlamaConfig` to replace (`{"rope_scaling": ...}`: evaluating another rotary
    scaling than the checkpoint's)."""
    model, params, loaded = load_with_tokenizer(path, tokenizer, dtype, adapters, head,
                                                mesh=mesh, **execution)  # fmt: skip
    if config:
        model = Llama(model.config.replace(**config), model.execution, model.lora)
    return inference.Engine(model, params, mesh=mesh, donate=True), loaded


def checkpoint_tokenizer(path: str, tokenizer: str | None, vocab_size: int):
    """The tokenizer of the checkpoint at `path`: its own `tokenizer.model` (converted
    checkpoints and training workdirs keep one), or `tokenizer`, refused when it is not the
    checkpoint's (a different file gives other ids: outputs that mean nothing) or has more ids
    than the model's `vocab_size`."""
    from llamax.data.tokenizer import Tokenizer

    own = fs.join(path, "tokenizer.model")
    if tokenizer and fs.exists(own) and fs.sha256(own) != fs.sha256(tokenizer):
        raise ValueError(
            f"{tokenizer} is not the tokenizer of {path} ({own} differs): leave out "
            "--tokenizer to use the checkpoint's own"
        )
    if not tokenizer and not fs.exists(own):
        raise FileNotFoundError(f"No tokenizer.model in {path}: pass --tokenizer")
    loaded = Tokenizer(tokenizer or own)
    if loaded.vocab_size > vocab_size:
        raise ValueError(
            f"{loaded.path} has {loaded.vocab_size} pieces, more than the model's vocabulary "
            f"({vocab_size}): not this model's tokenizer"
        )
    return loaded
