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

Importing reads the files as untrusted input. Every field of `adapter_config.json` is
checked, with one error naming the file and the field, and what llamax cannot represent is
named (bias training, DoRA, per-layer or per-module ranks, a subset of layers,
`fan_in_fan_out`, modules to save other than the score head, initializations that change the
base itself). The names, shapes and dtypes (floating point) of every tensor are checked from
the safetensors header before any tensor is read; then the tensors are read one at a time and
a NaN or infinite value is refused, naming the tensor, as is a merged weight that is not
finite.

An export's `base_model_name_or_path` is what PEFT loads the base by: `--base-name` (a Hugging
Face hub id or a local Hugging Face directory), else the Hugging Face directory the run's base
was converted from (its `manifest.json` records the source), so that
`AutoPeftModelForCausalLM.from_pretrained(adapters)` finds it.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np

from llamax import fs
from llamax.config import LlamaConfig
from llamax.convert import manifest
from llamax.convert.formats import (
    FormatError,
    SafetensorsWriter,
    load_safetensors,
    require_finite,
)
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
# An adapter_config.json is a few kilobytes: anything larger is not one, and is not read.
MAX_CONFIG_BYTES = 1 << 20
# The dtypes adapters may be stored in (what PEFT saves: the model's floating-point types).
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
# PEFT's initializations that leave the base as it is (the others, PiSSA, OLoRA, CorDA,
# LoftQ, LoRA-GA, change the base's weights, which the adapters then need).
KEPT_BASE_INITS = (True, False, "gaussian", "orthogonal", "eva")
# The merge is computed in float32: a scale beyond its range makes every merged weight inf.
MAX_SCALE = float(np.finfo(np.float32).max)


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
    """Writes `adapters` as a PEFT adapter directory `output_dir` (`write_adapters`),
    atomically."""
    with fs.atomic_path(output_dir) as tmp:
        fs.makedirs(tmp)
        write_adapters(adapters, lora, tmp, base_model)


def write_adapters(adapters, lora: LoraConfig, directory: str, base_model: str = "") -> None:
    """Writes `adapters` (llamax's tree, layers stacked: `{"layers": {"attention": {"wq_lora_a":
    [L, D, r], ...}}}`, with a reward model's trained `score` [D, 1] when it has one) in PEFT's
    format into the local directory `directory`, refusing a tensor that is not finite."""
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
    for name, value in tensors.items():
        require_finite(name, value, "the adapters to export")
    with fs.open(fs.join(directory, CONFIG_FILE), "w") as f:
        json.dump(adapter_config(lora, base_model, score), f, indent=2, sort_keys=True)
    local = fs.join(directory, WEIGHTS_FILE)
    writer = SafetensorsWriter(local, {k: (v.shape, v.dtype) for k, v in tensors.items()})
    for name, value in tensors.items():
        writer.write(name, value)
    writer.close()


# ----- what PEFT loads the base by -----


def base_model_name(base: str, explicit: str | None = None) -> str:
    """The `base_model_name_or_path` of a LoRA run's exported adapters, whose base is the
    llamax checkpoint `base`: `explicit` (`--base-name`: a Hugging Face hub id or a local
    directory of the base in Hugging Face's format), else the Hugging Face directory `base`
    was converted from (its `manifest.json` records its source); else an error saying how to
    make one. A llamax path there would send PEFT to the hub for a model of that name."""
    if explicit is not None:
        return _checked_base_name(explicit)
    source = manifest.source(base)
    if source and source["format"] == "hf":
        if fs.isfile(fs.join(source["path"], "config.json")):
            return source["path"]
        problem = (f"it was converted from the Hugging Face directory {source['path']}, which "
                   "is no longer there")  # fmt: skip
    elif source:
        problem = f"it was converted from {source['format']} ({source['path']})"
    elif fs.isfile(fs.join(base, manifest.NAME)):
        problem = f"its {manifest.NAME} records no source (written by an older llamax)"
    else:
        problem = "it is not a converted checkpoint (no manifest.json)"
    raise ValueError(
        f"--to peft: the adapters' base_model_name_or_path must be a model PEFT can load, and "
        f"the run's base {base} is not from a Hugging Face directory ({problem}): pass "
        f"--base-name with a Hugging Face hub id or a local Hugging Face directory of the base; "
        f"make one with llamax-convert --from llamax --to hf --input {base} "
        f"--output {base.rstrip('/')}-hf"
    )


def _checked_base_name(name: str) -> str:
    """`--base-name` when it can name a Hugging Face model: an existing path must be a Hugging
    Face model directory (made absolute); anything else is taken as a hub id (`owner/name`)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("--base-name is empty: give a Hugging Face hub id or directory")
    if fs.exists(name):
        config = fs.join(name, "config.json")
        hf = False
        if fs.isfile(config) and fs.getsize(config) <= MAX_CONFIG_BYTES:
            try:
                hf = "model_type" in fs.read_json(config)
            except (ValueError, TypeError, RecursionError):
                hf = False
        if not hf:
            raise ValueError(
                f"--base-name {name} is not a Hugging Face model directory (no config.json with "
                f"a model_type); make one with llamax-convert --from llamax --to hf --input "
                f"BASE --output {name.rstrip('/')}-hf"
            )
        return fs.absolute(name)  # loadable from any directory, unlike a relative path
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) or name.startswith((".", "-")):
        raise ValueError(
            f"--base-name {name}: no such directory, and not a Hugging Face hub id (owner/name)"
        )
    return name


# ----- adapter_config.json -----


def _read_json(directory: str) -> tuple[str, dict]:
    """(path, content) of a directory's `adapter_config.json`, refused with its name when it is
    not a file, too large, empty, not UTF-8, not JSON, nested too deep, or not a LoRA config
    object."""
    path = fs.join(directory, CONFIG_FILE)
    try:
        fs.require_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: not a PEFT adapter directory") from None
    size = fs.getsize(path)
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path} is {size:,} bytes, not an adapter config (a few kilobytes; "
                         f"limit {MAX_CONFIG_BYTES:,})")  # fmt: skip
    if size == 0:
        raise ValueError(f"{path} is empty: not an adapter config")
    try:
        c = json.loads(fs.read_bytes(path).decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: not an adapter config ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: its JSON is nested too deep to be an adapter config") from None
    except ValueError as e:
        raise ValueError(f"{path} is not JSON: not an adapter config ({e})") from None
    if not isinstance(c, dict):
        raise ValueError(f"{path} is a JSON {type(c).__name__}, not an adapter config object")
    if c.get("peft_type") != "LORA":
        raise ValueError(f"{path}: not a LoRA adapter (peft_type {str(c.get('peft_type'))[:50]!r})")
    return path, c


def _shown(value) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _checked_config(path: str, c: dict) -> tuple[LoraConfig, tuple[str, ...]]:
    """(the LoRA config, the saved modules llamax has) of a parsed `adapter_config.json`:
    every field llamax reads checked, one `ValueError` naming the file and the field."""
    if "r" not in c:
        raise ValueError(f"{path}: r must be a positive integer (the rank); it is missing")
    r = c["r"]
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"{path}: r must be a positive integer, got {_shown(r)}")
    alpha = c.get("lora_alpha", 8)
    if not _is_number(alpha) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{path}: lora_alpha must be a finite positive number, got "
                         f"{_shown(alpha)}")  # fmt: skip
    for flag in ("use_rslora", "fan_in_fan_out", "use_dora", "inference_mode"):
        if c.get(flag) is not None and not isinstance(c[flag], bool):
            raise ValueError(f"{path}: {flag} must be true or false, got {_shown(c[flag])}")
    rslora = bool(c.get("use_rslora"))
    scale = alpha / (math.sqrt(r) if rslora else r)
    if scale > MAX_SCALE:
        raise ValueError(
            f"{path}: lora_alpha {alpha:g} makes the adapters' scale {scale:.3g}, beyond "
            f"float32's range ({MAX_SCALE:.3g}), in which merged weights are computed: every "
            "adapted weight would be infinite"
        )
    dropout = c.get("lora_dropout", 0.0)
    if not _is_number(dropout) or not 0 <= dropout < 1:
        raise ValueError(f"{path}: lora_dropout must be a number in [0, 1), got "
                         f"{_shown(dropout)}")  # fmt: skip
    modules = c.get("modules_to_save")
    if modules is not None and not (
        isinstance(modules, list) and all(isinstance(m, str) for m in modules)
    ):
        raise ValueError(f"{path}: modules_to_save must be null or a list of module names, got "
                         f"{_shown(modules)}")  # fmt: skip
    modules = modules or []
    init = c.get("init_lora_weights", True)
    unsupported = {
        "bias": c.get("bias", "none") != "none", "use_dora": bool(c.get("use_dora")),
        "fan_in_fan_out": bool(c.get("fan_in_fan_out")),
        "layers_to_transform": c.get("layers_to_transform") is not None,
        "rank_pattern": bool(c.get("rank_pattern")), "alpha_pattern": bool(c.get("alpha_pattern")),
        "modules_to_save": bool(set(modules) - set(SAVED_MODULES)),
        "init_lora_weights": not any(init is v or (isinstance(v, str) and init == v)
                                     for v in KEPT_BASE_INITS),
        **{k: bool(c.get(k)) for k in ("lora_bias", "exclude_modules", "target_parameters",
                                       "trainable_token_indices", "layer_replication",
                                       "use_qalora", "alora_invocation_tokens")},
    }  # fmt: skip
    bad = sorted(k for k, v in unsupported.items() if v)
    if bad:
        detail = ""
        if unsupported["modules_to_save"]:
            detail = (f" (modules_to_save {modules}: only a reward model's score head trains "
                      "beside llamax's adapters)")  # fmt: skip
        elif unsupported["init_lora_weights"]:
            detail = (f" (init_lora_weights {_shown(init)} changes the base's own weights; "
                      "llamax merges adapters into the base as it is)")  # fmt: skip
        raise ValueError(f"{path}: settings llamax's LoRA does not have: {bad}{detail}")
    names = {hf.split(".")[1]: t for t, (_, hf) in MODULES.items()}
    targets = c.get("target_modules")
    if isinstance(targets, str):
        raise ValueError(
            f"{path}: target_modules {_shown(targets)} is a pattern (PEFT matches a string "
            f"as a regular expression), which llamax does not read: list the modules, among "
            f"{sorted(names)}"
        )
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{path}: target_modules must be a list of module names, got "
                         f"{_shown(targets)}")  # fmt: skip
    unknown = sorted(set(targets) - set(names))
    if unknown:
        raise ValueError(f"{path}: target modules {unknown} are not Llama's ({sorted(names)})")
    lora = LoraConfig(
        rank=r, alpha=alpha, targets=tuple(t for t in MODULES if MODULES[t][1].split(".")[1]
                                           in targets),
        dropout=dropout, rslora=rslora,
    )  # fmt: skip
    return lora, ("score",) if "score" in modules else ()


def saved_modules(directory: str) -> tuple[str, ...]:
    """The modules a PEFT adapter trained whole beside its adapters (`modules_to_save`) that
    a Llama has: a reward model's "score", or none."""
    return _checked_config(*_read_json(directory))[1]


def read_adapter_config(directory: str) -> LoraConfig:
    """The LoRA config of a PEFT adapter directory, every field of its `adapter_config.json`
    checked (`ValueError` naming the file and the field)."""
    return _checked_config(*_read_json(directory))[0]


def adapted_config(config: LlamaConfig, adapters) -> LlamaConfig:
    """The model that `adapters` (llamax's tree) make of a base of `config`: a reward model
    when they bring a score head (on a language model's body too), else the base's."""
    return config.replace(head="score") if "score" in adapters else config


def merged_tensors(
    config: LlamaConfig, tensors: dict, adapters, lora: LoraConfig
) -> tuple[LlamaConfig, dict]:
    """The config and lazy Hugging Face tensors (`llamax.convert.native.Tensors`) of a base
    with `adapters` (llamax's tree, layers stacked) merged in: each adapted [out, in] weight
    read as W + s B^T A^T, in float32, one layer at a time, refused when it is not finite
    (`FormatError` naming it); a score head trained beside them replaces the base's head
    (`adapted_config`)."""
    from llamax.convert.hf import HEAD, LAYER_MAP

    merged = dict(tensors)
    adapted = adapted_config(config, adapters)
    if "score" in adapters:
        del merged[HEAD[config.head][1]]
        score = np.asarray(adapters["score"], np.float32).T  # [1, dim], small
        merged[HEAD["score"][1]] = lambda: score
    layers = adapters["layers"]
    where = f"with the LoRA adapters merged (W + s B A, s = {lora.scale:g})"
    for target in lora.targets:
        module = MODULES[target][0]
        hf_name = LAYER_MAP[(module, target)][0]
        a, b = (np.asarray(layers[module][f"{target}_lora_{x}"], np.float32) for x in "ab")
        for i in range(config.n_layers):
            name = f"model.layers.{i}.{hf_name}"
            a_i, b_i = a[i].reshape(-1, lora.rank), b[i].reshape(lora.rank, -1)  # small

            def merge(name=name, base=tensors[name], a_i=a_i, b_i=b_i):
                with np.errstate(over="ignore", invalid="ignore"):
                    w = np.asarray(base(), np.float32) + lora.scale * (b_i.T @ a_i.T)
                return require_finite(f"{name} {where}", w)

            merged[name] = merge
    return adapted, merged


# ----- the adapters' tensors -----


def _expected_shapes(config: LlamaConfig, lora: LoraConfig) -> dict:
    """Per target, (llamax's (in..., out...) of its weight, PEFT's A and B shapes)."""
    r, d, f, h = lora.rank, config.dim, config.hidden_dim, config.head_dim
    shapes = {  # (in..., out...) of each weight in llamax's layout
        "wq": ((d,), (config.n_heads, h)), "wk": ((d,), (config.kv_heads, h)),
        "wv": ((d,), (config.kv_heads, h)), "wo": ((config.n_heads, h), (d,)),
        "w1": ((d,), (f,)), "w3": ((d,), (f,)), "w2": ((f,), (d,)),
    }  # fmt: skip
    out = {}
    for target in lora.targets:
        inputs, outputs = shapes[target]
        n_in, n_out = math.prod(inputs), math.prod(outputs)
        out[target] = (inputs, outputs, (r, n_in), (n_out, r))
    return out


def _header(path: str) -> dict:
    """The lazy tensors of the adapters' safetensors file by PEFT's plain names (without its
    `.default` adapter name), from its checked header: nothing is read yet."""
    lazy = {}
    for stored, tensor in load_safetensors(path).items():
        name = stored.replace(".modules_to_save.default.", ".").replace(".default.", ".")
        if name in lazy:
            raise FormatError(f"{path}: two tensors are {name[:200]}")
        lazy[name] = tensor
    return lazy


def _check_header(path: str, lazy: dict, want: dict) -> None:
    """Every expected tensor present with its shape and a floating-point dtype, and no other:
    checked from the header, before any tensor is read."""
    missing = [name for name in want if name not in lazy]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FormatError(f"{path}: missing {missing[0]}{more}")
    extra = sorted(set(lazy) - set(want))
    if extra:
        raise FormatError(f"{path}: tensors llamax does not know: {[e[:200] for e in extra[:5]]}")
    for name, shape in want.items():
        got = tuple(lazy[name].shape)
        if got != shape:
            raise FormatError(f"{path}: {name} has shape {got}, expected {shape}")
        dtype = np.dtype(lazy[name].dtype).name
        if dtype not in FLOAT_DTYPES:
            floats = ", ".join(FLOAT_DTYPES)
            raise FormatError(f"{path}: {name} is {dtype}; adapters are floating point ({floats})")


def import_adapters(directory: str, config: LlamaConfig) -> tuple[dict, LoraConfig]:
    """A PEFT adapter directory as llamax's adapter tree (float32, layers stacked) for a base
    of `config`, and its LoRA config. Every tensor's name, shape and dtype is checked from the
    safetensors header before any is read; then each is read alone and refused when it holds
    a NaN or an infinite value (`FormatError` naming it). A sequence classifier's adapters
    bring their trained score head (`modules_to_save`) as the tree's `score` [dim, 1]
    (`adapted_config`: a reward model)."""
    config_path, c = _read_json(directory)
    lora, modules = _checked_config(config_path, c)
    if c.get("task_type") == "SEQ_CLS" and not modules and config.head != "score":
        raise FormatError(
            f"{directory}: a sequence classifier's adapters without its score head in "
            "modules_to_save need a reward model as their base, and this base is a language "
            "model"
        )
    shapes = _expected_shapes(config, lora)
    for target, (_, _, (r, n_in), (n_out, _)) in shapes.items():
        if r > min(n_in, n_out):
            raise ValueError(
                f"{config_path}: r {r} is more than {MODULES[target][1]}'s smallest side "
                f"({min(n_in, n_out)} of {n_out} x {n_in}): a LoRA update's rank is at most that"
            )
    path = fs.join(directory, WEIGHTS_FILE)
    try:
        fs.require_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found (PEFT's .bin adapters are not read)") from None
    lazy = _header(path)
    want = {SCORE: (1, config.dim)} if modules else {}
    for target, (_, _, a_shape, b_shape) in shapes.items():
        for i in range(config.n_layers):
            want[_name(i, target, "A")], want[_name(i, target, "B")] = a_shape, b_shape
    _check_header(path, lazy, want)

    def load(name):
        return require_finite(name, np.asarray(lazy[name].load(), np.float32), path)

    layers: dict[str, dict] = {}
    out: dict = {"layers": layers}
    if modules:  # the score head, trained beside the adapters
        out["score"] = load(SCORE).T
    for target, (inputs, outputs, _, _) in shapes.items():
        a = [load(_name(i, target, "A")).T.reshape(*inputs, lora.rank)
             for i in range(config.n_layers)]  # fmt: skip
        b = [load(_name(i, target, "B")).T.reshape(lora.rank, *outputs)
             for i in range(config.n_layers)]  # fmt: skip
        module = layers.setdefault(MODULES[target][0], {})
        module[f"{target}_lora_a"], module[f"{target}_lora_b"] = np.stack(a), np.stack(b)
    return out, lora
