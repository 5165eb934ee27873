"""LoRA adapters in Hugging Face PEFT's format: `adapter_config.json` and
`adapter_model.safetensors`, which `peft.PeftModel.from_pretrained` loads on top of the
Hugging Face `LlamaForCausalLM` that `llamax-convert --to hf` makes of the base.

PEFT keeps, per adapted `nn.Linear` of weight [out, in], `lora_A.weight` [r, in] and
`lora_B.weight` [out, r] (its update is x A^T B^T, scaled by lora_alpha / r, or / sqrt(r)
with `use_rslora`); llamax's adapters are A [in..., r] and B [r, out...] per layer (stacked on
a leading layer axis), with the Hugging Face weights' row-major flattening of heads, so each
is a reshape and a transpose. Names: `base_model.model.model.layers.{i}.self_attn.q_proj.
lora_A.weight`, ... (`wq wk wv wo` -> `q_proj k_proj v_proj o_proj`, `w1 w3 w2` ->
`gate_proj up_proj down_proj`).

A LoRA reward model (`model.head = "score"`) trains its score head whole beside the adapters:
it is PEFT's `modules_to_save` of a `LlamaForSequenceClassification` (`task_type` "SEQ_CLS",
`modules_to_save: ["score"]`), saved as `base_model.model.score.weight` [1, dim], which
`PeftModel.from_pretrained` puts in place of the base's score head; imported, it makes a
reward model of any base (a language model's body too).

Importing checks what llamax cannot represent and says so: bias training, DoRA, per-layer
or per-module ranks, a subset of layers, `fan_in_fan_out`, modules to save other than the
score head.
"""

from __future__ import annotations

import json

import numpy as np

from llamax import fs
from llamax.config import LlamaConfig
from llamax.convert.formats import FormatError, SafetensorsWriter, load_safetensors
from llamax.lora import LoraConfig

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# llamax weight -> (its module in a layer, Hugging Face's module name)
MODULES = {
    "wq": ("attention", "self_attn.q_proj"), "wk": ("attention", "self_attn.k_proj"),
    "wv": ("attention", "self_attn.v_proj"), "wo": ("attention", "self_attn.o_proj"),
    "w1": ("feed_forward", "mlp.gate_proj"), "w3": ("feed_forward", "mlp.up_proj"),
    "w2": ("feed_forward", "mlp.down_proj"),
}  # fmt: skip
PREFIX = "base_model.model.model.layers"
# A reward model's score head, trained whole beside the adapters: PEFT's name for it (a
# `modules_to_save` weight, [1, dim]), and the modules to save a sequence-classification
# adapter may name (PEFT adds "classifier" to SEQ_CLS configs itself; Llama has none).
SCORE = "base_model.model.score.weight"
SAVED_MODULES = ("score", "classifier")


def _name(layer: int, target: str, which: str) -> str:
    return f"{PREFIX}.{layer}.{MODULES[target][1]}.lora_{which}.weight"


def adapter_config(lora: LoraConfig, base_model: str = "", score: bool = False) -> dict:
    """PEFT's `adapter_config.json`; `score`: a reward model's adapters, whose score head trains
    beside them (a sequence classifier's `modules_to_save`)."""
    return {
        "peft_type": "LORA", "task_type": "SEQ_CLS" if score else "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "use_rslora": lora.rslora, "target_modules": sorted(MODULES[t][1].split(".")[1]
                                                            for t in lora.targets),
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": ["score"] if score else None,
        "layers_to_transform": None,
        "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False,
    }  # fmt: skip


def export_adapters(adapters, lora: LoraConfig, output_dir: str, base_model: str = "") -> None:
    """Writes `adapters` (llamax's tree, layers stacked: `{"layers": {"attention": {"wq_lora_a":
    [L, D, r], ...}}}`, with a reward model's trained `score` [D, 1] when it has one) as a PEFT
    adapter directory, atomically."""
    layers = adapters["layers"]
    tensors = {}
    score = "score" in adapters
    if score:
        tensors[SCORE] = np.asarray(adapters["score"], np.float32).T
    for target in lora.targets:
        module = layers[MODULES[target][0]]
        a, b = (np.asarray(module[f"{target}_lora_{x}"], np.float32) for x in "ab")
        for i in range(a.shape[0]):
            tensors[_name(i, target, "A")] = a[i].reshape(-1, lora.rank).T
            tensors[_name(i, target, "B")] = b[i].reshape(lora.rank, -1).T
    with fs.atomic_path(output_dir) as tmp:
        fs.makedirs(tmp)
        with fs.open(fs.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(adapter_config(lora, base_model, score), f, indent=2, sort_keys=True)
        local = fs.join(tmp, WEIGHTS_FILE)
        writer = SafetensorsWriter(local, {k: (v.shape, v.dtype) for k, v in tensors.items()})
        for name, value in tensors.items():
            writer.write(name, value)
        writer.close()


def _read_json(directory: str) -> tuple[str, dict]:
    path = fs.join(directory, CONFIG_FILE)
    if not fs.isfile(path):
        raise FileNotFoundError(f"{path} not found: not a PEFT adapter directory")
    c = fs.read_json(path)
    if not isinstance(c, dict) or c.get("peft_type") != "LORA":
        raise ValueError(f"{path}: not a LoRA adapter (peft_type {c.get('peft_type')!r})")
    return path, c


def saved_modules(directory: str) -> tuple[str, ...]:
    """The modules a PEFT adapter trained whole beside its adapters (`modules_to_save`) that
    a Llama has: a reward model's "score", or none."""
    _, c = _read_json(directory)
    return ("score",) if "score" in (c.get("modules_to_save") or ()) else ()


def read_adapter_config(directory: str) -> LoraConfig:
    path, c = _read_json(directory)
    modules = c.get("modules_to_save") or []
    unsupported = {
        "bias": c.get("bias", "none") != "none", "use_dora": bool(c.get("use_dora")),
        "fan_in_fan_out": bool(c.get("fan_in_fan_out")),
        "layers_to_transform": c.get("layers_to_transform") is not None,
        "rank_pattern": bool(c.get("rank_pattern")), "alpha_pattern": bool(c.get("alpha_pattern")),
        "modules_to_save": isinstance(modules, str) or bool(set(modules) - set(SAVED_MODULES)),
    }  # fmt: skip
    bad = sorted(k for k, v in unsupported.items() if v)
    if bad:
        detail = ""
        if unsupported["modules_to_save"]:
            detail = (f" (modules_to_save {modules}: only a reward model's score head trains "
                      "beside llamax's adapters)")  # fmt: skip
        raise ValueError(f"{path}: settings llamax's LoRA does not have: {bad}{detail}")
    names = {hf.split(".")[1]: t for t, (_, hf) in MODULES.items()}
    modules = c.get("target_modules")
    if isinstance(modules, str) or not modules:
        raise ValueError(f"{path}: target_modules must be a list of module names, got {modules!r}")
    unknown = sorted(set(modules) - set(names))
    if unknown:
        raise ValueError(f"{path}: target modules {unknown} are not Llama's ({sorted(names)})")
    targets = tuple(t for t in MODULES if MODULES[t][1].split(".")[1] in modules)
    return LoraConfig(
        rank=c["r"], alpha=c["lora_alpha"], targets=targets,
        dropout=c.get("lora_dropout", 0.0), rslora=bool(c.get("use_rslora")),
    )  # fmt: skip


def adapted_config(config: LlamaConfig, adapters) -> LlamaConfig:
    """The model that `adapters` (llamax's tree) make of a base of `config`: a reward model
    when they bring a score head (on a language model's body too), else the base's."""
    return config.replace(head="score") if "score" in adapters else config


def merged_tensors(
    config: LlamaConfig, tensors: dict, adapters, lora: LoraConfig
) -> tuple[LlamaConfig, dict]:
    """The config and lazy Hugging Face tensors (`llamax.convert.native.Tensors`) of a base
    with `adapters` (llamax's tree, layers stacked) merged in: each adapted [out, in] weight
    read as W + s B^T A^T, in float32, one layer at a time; a score head trained beside them
    replaces the base's head (`adapted_config`)."""
    from llamax.convert.hf import HEAD, LAYER_MAP

    merged = dict(tensors)
    adapted = adapted_config(config, adapters)
    if "score" in adapters:
        del merged[HEAD[config.head][1]]
        score = np.asarray(adapters["score"], np.float32).T  # [1, dim], small
        merged[HEAD["score"][1]] = lambda: score
    layers = adapters["layers"]
    for target in lora.targets:
        module = MODULES[target][0]
        hf_name = LAYER_MAP[(module, target)][0]
        a, b = (np.asarray(layers[module][f"{target}_lora_{x}"], np.float32) for x in "ab")
        for i in range(config.n_layers):
            name = f"model.layers.{i}.{hf_name}"
            a_i, b_i = a[i].reshape(-1, lora.rank), b[i].reshape(lora.rank, -1)  # small
            merged[name] = lambda base=tensors[name], a_i=a_i, b_i=b_i: (
                np.asarray(base(), np.float32) + lora.scale * (b_i.T @ a_i.T)
            )
    return adapted, merged


def import_adapters(directory: str, config: LlamaConfig) -> tuple[dict, LoraConfig]:
    """A PEFT adapter directory as llamax's adapter tree (float32, layers stacked) for a base
    of `config`, and its LoRA config; clear errors for missing, extra or misshapen tensors.
    A sequence classifier's adapters bring their trained score head (`modules_to_save`) as
    the tree's `score` [dim, 1] (`adapted_config`: a reward model)."""
    lora = read_adapter_config(directory)
    modules = saved_modules(directory)
    task = _read_json(directory)[1].get("task_type")
    if task == "SEQ_CLS" and not modules and config.head != "score":
        raise FormatError(
            f"{directory}: a sequence classifier's adapters without its score head in "
            "modules_to_save need a reward model as their base, and this base is a language "
            "model"
        )
    path = fs.join(directory, WEIGHTS_FILE)
    if not fs.isfile(path):
        raise FileNotFoundError(f"{path} not found (PEFT's .bin adapters are not read)")
    with fs.local_file(path) as local:
        tensors = {k: v.load() for k, v in load_safetensors(local).items()}
        tensors = {k.replace(".modules_to_save.default.", ".").replace(".default.", "."): v
                   for k, v in tensors.items()}  # fmt: skip
    r, d, f, h = lora.rank, config.dim, config.hidden_dim, config.head_dim
    shapes = {  # (in..., out...) of each weight in llamax's layout
        "wq": ((d,), (config.n_heads, h)), "wk": ((d,), (config.kv_heads, h)),
        "wv": ((d,), (config.kv_heads, h)), "wo": ((config.n_heads, h), (d,)),
        "w1": ((d,), (f,)), "w3": ((d,), (f,)), "w2": ((f,), (d,)),
    }  # fmt: skip
    layers: dict[str, dict] = {}
    out: dict = {"layers": layers}
    expected = set()
    if modules:  # the score head, trained beside the adapters
        expected.add(SCORE)
        if SCORE not in tensors:
            raise FormatError(f"{path}: missing {SCORE} (modules_to_save {list(modules)})")
        if tuple(tensors[SCORE].shape) != (1, d):
            raise FormatError(f"{path}: {SCORE} has shape {tuple(tensors[SCORE].shape)}, "
                              f"expected {(1, d)}")  # fmt: skip
        out["score"] = np.asarray(tensors[SCORE], np.float32).T
    for target in lora.targets:
        inputs, outputs = shapes[target]
        a_list, b_list = [], []
        for i in range(config.n_layers):
            a_name, b_name = _name(i, target, "A"), _name(i, target, "B")
            expected |= {a_name, b_name}
            want = {a_name: (r, int(np.prod(inputs))), b_name: (int(np.prod(outputs)), r)}
            for name, shape in want.items():
                if name not in tensors:
                    raise FormatError(f"{path}: missing {name}")
                got = tuple(tensors[name].shape)
                if got != shape:
                    raise FormatError(f"{path}: {name} has shape {got}, expected {shape}")
            a_list.append(np.asarray(tensors[a_name], np.float32).T.reshape(*inputs, r))
            b_list.append(np.asarray(tensors[b_name], np.float32).T.reshape(r, *outputs))
        module = layers.setdefault(MODULES[target][0], {})
        module[f"{target}_lora_a"], module[f"{target}_lora_b"] = np.stack(a_list), np.stack(b_list)
    extra = sorted(set(tensors) - expected)
    if extra:
        raise FormatError(f"{path}: tensors llamax does not know: {extra[:5]}")
    return out, lora
