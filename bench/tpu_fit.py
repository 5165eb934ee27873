"""The TPU fit table: ahead-of-time compiles of the train step over slices and batch sizes.

    .venv/bin/python bench/tpu_fit.py [--only 7b] [--out docs/tpu_fit.md]

Each row compiles the train step of `llamax.setup.build` for a config for a TPU slice with
`llamax.aot.check` (libtpu from PyPI; no TPU needed), one micro-batch per step
(`grad_accum_steps=1`), fsdp over every chip, and prints one JSON line. The table goes to
docs/tpu_fit.md with the `llamax-aot` command that reproduces each row. Several minutes per
large model on a 2-core machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import time

import jax

from llamax import aot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2**30
# (config, slice, per-device batch, attention[, remat policy]); seq_len is the config's.
CASES = [
    ("llama2_7b", "v5e-16", 1, "xla"),
    ("llama2_7b", "v5e-16", 1, "splash"),
    ("llama2_7b", "v5e-16", 2, "splash"),
    ("llama2_7b", "v5e-16", 4, "splash"),
    ("llama2_7b", "v5e-256", 4, "splash"),
    ("llama2_7b", "v4-8", 1, "splash"),
    ("llama2_13b", "v4-64", 1, "splash"),
    ("llama2_13b", "v4-64", 2, "splash"),
    ("llama2_70b", "v4-256", 1, "xla"),
    ("llama2_70b", "v4-256", 1, "splash"),
    ("llama2_7b_extend_16k", "v4-64", 1, "chunked"),
    ("llama2_7b_extend_16k", "v4-64", 1, "splash"),
    ("llama2_7b_extend_32k", "v4-128", 1, "splash"),
    ("llama2_7b", "v5p-8", 1, "splash"),
    ("llama2_13b", "v5p-64", 2, "splash"),
    ("llama2_70b", "v5p-64", 1, "xla"),
    ("llama2_70b", "v5p-64", 1, "splash"),
    ("llama2_70b", "v5p-128", 2, "splash"),
]
# Fine-tuning: chat SFT (every parameter) and LoRA (r 64 on every matrix) over a bfloat16, an
# int8 or an nf4 base; a LoRA config needs an init_from to compile, which it never reads.
FINETUNE_CASES = [
    ("llama2_7b_chat_sft", "v5e-16", 1, "auto"),
    ("llama2_7b_lora", "v5e-4", 1, "auto"),
    ("llama2_7b_lora", "v5e-1", 1, "auto"),
    ("llama2_7b_lora_int8", "v5e-4", 1, "auto"),
    ("llama2_7b_lora_int8", "v5e-1", 1, "auto"),
    ("llama2_7b_qlora_nf4", "v5e-1", 1, "auto"),
]
# Context parallelism: 7B at 32k tokens, 64 sequences per step (Chen et al.'s batch), as
# (config, slice, sequences per step, mesh.context, attention); fsdp takes the other chips.
CONTEXT_CASES = [
    ("llama2_7b_extend_32k", "v5e-256", 64, 4, "auto"),
    ("llama2_7b_extend_32k", "v4-128", 64, 2, "auto"),
    ("llama2_7b_extend_32k", "v4-128", 64, 4, "auto"),
    ("llama2_7b_extend_32k", "v4-128", 64, 1, "splash"),  # the recipe's run
]
# PPO of 7B (configs/llama2_7b_ppo.py: policy, value model, reference, two reward models,
# rows of 4,096 tokens), full and LoRA (r 64 on every matrix), as (config, slice, LoRA rank,
# decode slots): the smallest v5e and v5p slices that fit, and the slice below each. The
# decode state is the slots' KV cache of whole rows (0.5 MiB a token for 7B): 64 slots take
# 128 GiB over the slice, so a small slice decodes fewer rollouts at once.
PPO_CASES = [
    ("llama2_7b_ppo", "v5e-16", 0, 64),
    ("llama2_7b_ppo", "v5e-32", 0, 64),
    ("llama2_7b_ppo", "v5p-8", 0, 16),
    ("llama2_7b_ppo", "v5e-8", 64, 16),
    ("llama2_7b_ppo", "v5e-16", 64, 32),
    ("llama2_7b_ppo", "v5p-8", 64, 64),
]
LORA_TARGETS = "wq,wk,wv,wo,w1,w2,w3"
# The memory side of the remat trade-off: 7B on v4-32 (16 chips of 32 GiB), 1 sequence each.
REMAT_CASES = [
    ("llama2_7b", "v4-32", 1, "splash", policy)
    for policy in ("full", "save_qkv_proj", "dots_no_batch", "dots", "none")
]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def config_for(name: str, tpu: str, per_device: int, attention: str, remat: str = "full"):
    c = load(name)
    chips = aot.parse_slice(tpu).chips
    c.train.batch_size, c.train.grad_accum_steps = per_device * chips, 1
    c.model.attention, c.model.remat_policy = attention, remat
    if c.lora.rank:
        c.init_from = "/unused"
    return c


def context_config(name: str, tpu: str, batch: int, context: int, attention: str):
    c = load(name)
    c.train.batch_size, c.train.grad_accum_steps = batch, 1
    c.mesh.context, c.model.attention, c.init_from = context, attention, "/unused"
    return c


def ppo_config(name: str, tpu: str, rank: int, slots: int):
    """The PPO recipe on a slice: minibatches of 64 rows, one row a chip a micro-batch; its
    reward models' architecture from a checkpoint directory holding only its config.json
    (`reward_model_stub`: an ahead-of-time compile reads no weights)."""
    c = load(name)
    c.train.grad_accum_steps = max(c.train.batch_size // aot.parse_slice(tpu).chips, 1)
    c.model.attention = "splash"
    stub = reward_model_stub(c)
    c.init_from, c.ppo.helpful_rm, c.ppo.safety_rm = "/unused", stub, stub
    c.data.files, c.data.tokenizer = "/unused", "/unused"
    c.ppo.rollout_slots = slots
    if rank:
        c.lora.rank, c.lora.alpha, c.lora.targets = rank, 16.0, LORA_TARGETS
    return c


def reward_model_stub(c) -> str:
    """A directory whose config.json is the reward model of `c`'s architecture (its score
    head): what `llamax-aot` reads of a reward model."""
    from llamax import experiment

    path = os.path.join(REPO, "runs", "aot", f"{c.model.preset}-reward-model")
    os.makedirs(path, exist_ok=True)
    config = experiment.model_config(c).replace(head="score")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config.to_dict(), f)
    return path


def ppo_command(name, tpu, rank, slots) -> str:
    chips = aot.parse_slice(tpu).chips
    return (
        f"llamax-aot --config configs/{name}.py --topology {tpu} "
        f"--config.train.grad_accum_steps={max(64 // chips, 1)} "
        f"--config.model.attention=splash --config.ppo.rollout_slots={slots} "
        "--config.init_from=/unused "
        "--config.ppo.helpful_rm=RM --config.ppo.safety_rm=RM "
        "--config.data.files=/unused --config.data.tokenizer=/unused"
        + (f" --config.lora.rank={rank} --config.lora.alpha=16 "
           f"--config.lora.targets={LORA_TARGETS}" if rank else "")
    )  # fmt: skip


def _ppo_table(rows) -> str:
    lines = [
        "| slice | policy | decode slots | peak / chip | policy update | value update | "
        "rollouts | policy state | value state | engine copy | decode state | HBM | fits |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (_, tpu, rank, slots), r in rows:
        head = f"| {tpu} | {'LoRA r' + str(rank) if rank else 'full'} | {slots} | "
        if "error" in r:
            lines.append(head + f"error: {r['error'][:80]} | | | | | | | | | |")
            continue
        g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
        ph = r["phase_bytes_per_chip"]
        over = [k for k, v in r["steps"].items() if not v["compiled"]]
        fits = "yes" if r["fits"] else "**no**" + (f" ({', '.join(over)}: XLA refused)"
                                                   if over else "")  # fmt: skip
        lines.append(
            head + f"{g(r['peak_bytes_per_chip'])} GiB | {g(ph['policy update'])} | "
            f"{g(ph['value update'])} | {g(ph['rollouts'])} | "
            f"{g(r['policy_state_bytes_per_chip'])} | {g(r['value_state_bytes_per_chip'])} | "
            f"{g(r['engine_copy_bytes_per_chip'])} | {g(r['decode_state_bytes_per_chip'])} | "
            f"{r['hbm_bytes_per_chip'] / GiB:.0f} GiB | {fits} |"
        )
    return "\n".join(lines)


def ppo_section(rows) -> str:
    when = time.strftime("%Y-%m-%d")
    commands = "\n".join(f"    {r['command']}" for _, r in rows)
    return f"""## PPO

Llama 2 7B's PPO iteration (configs/llama2_7b_ppo.py; `llamax-aot` measures a PPO config as
its iteration, `llamax.aot.check_ppo`), generated by `bench/tpu_fit.py --ppo` on {when}: the
policy, the value model (from the helpfulness reward model), the reference (a frozen copy of
the start; with LoRA, the base with the adapters off) and the helpfulness and safety reward
models, rows of 4,096 tokens, minibatches of 64 rows (one a chip a micro-batch), splash
attention, the rollouts decoding `ppo.rollout_slots` at once. Per chip, GiB: each phase
of an iteration is what one chip holds in it. The two update steps are compiled, each with
the other model's whole state resident; the rollouts hold both states, the engine's copy of
the policy's weights and the decode state of the slots (compiled; the decode step's own
temporaries, a token a slot, are not counted). The states are exact (shapes and shardings).

{_ppo_table(rows)}

The smallest slices: full PPO needs v5e-32 (on v5e-16 the states and 64 slots' cache take
more than the chip) or a single v5p-8 host with 16 slots; with LoRA, v5e-16 with 32 slots
(v5e-8 does not fit) or v5p-8. The decode slots trade memory for rollout speed: fewer slots
hold less cache and decode the iteration's 512 rollouts in more rounds. The reference and
the reward models beside the policy are held in float32, as their checkpoints store them
(two 7B reward models: 52 GiB over the slice); held in bfloat16 they would take half, the
lever left for fitting LoRA PPO on fewer v5e chips. PPO runs on one process for now
(docs/preference.md): v5p-8 is one host, so its rows run today; v5e slices of 16 chips or
more span several hosts, so their rows say what the memory allows once PPO runs on several
processes, not what runs now.

Each row, reproduced (RM: a reward model's checkpoint, or a directory holding only its
config.json, as `bench/tpu_fit.py` writes one):

{commands}
"""


def _ppo_row(case) -> dict:
    return _row(case, ppo_config, ppo_command, aot.check_ppo, "tpu_fit_ppo")


def replace_section(text: str, heading: str, section: str) -> str:
    """`text` (this page) with the section under `heading` replaced by `section` (up to the
    next heading of its level or the page's closing list of commands), or `section` put
    before that list when the page has none."""
    closing = text.rfind("\nEach row, reproduced:") + 1
    start = text.find(heading + "\n")
    if start < 0:
        start = end = closing
    else:
        after = text.find("\n## ", start + len(heading)) + 1 or len(text)
        end = min(after, closing) if closing > start else after
    return text[:start] + section.rstrip() + "\n\n" + text[end:]


def context_command(name, tpu, batch, context, attention) -> str:
    return (
        f"llamax-aot --config configs/{name}.py --topology {tpu} "
        f"--config.train.batch_size={batch} --config.train.grad_accum_steps=1 "
        f"--config.mesh.context={context} --config.model.attention={attention} "
        "--config.init_from=/unused"
    )


def _context_table(rows) -> str:
    lines = [
        "| slice | mesh (fsdp x context) | attention | tokens per chip | per-chip peak | HBM |",
        "|---|---|---|---|---|---|",
    ]
    for (_, tpu, batch, context, attention), r in rows:
        if "error" in r:
            lines.append(f"| {tpu} | x {context} | {attention} | error: {r['error'][:80]} | | |")
            continue
        mesh = r["mesh"]
        tokens = batch * r["seq_len"] // r["chips"]
        lines.append(
            f"| {tpu} | {mesh['fsdp']} x {mesh['context']} | {attention} | {tokens:,} | "
            f"{r['peak_bytes_per_chip'] / GiB:.2f} GiB | {r['hbm_bytes_per_chip'] / GiB:.0f} GiB |"
        )
    return "\n".join(lines)


def command(name, tpu, per_device, attention, remat="full") -> str:
    chips = aot.parse_slice(tpu).chips
    return (
        f"llamax-aot --config configs/{name}.py --topology {tpu} "
        f"--config.train.batch_size={per_device * chips} --config.train.grad_accum_steps=1 "
        f"--config.model.attention={attention}"
        + ("" if remat == "full" else f" --config.model.remat_policy={remat}")
        + (" --config.init_from=/unused" if "lora" in name else "")
    )


def _table(rows) -> str:
    lines = [
        "| config | slice | batch / chip | seq | attention | remat | peak / chip | temporaries "
        "| HBM | fits | compile |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (name, tpu, per_device, attention, *remat), r in rows:
        head = f"| {name} | {tpu} | {per_device} | {r.get('seq_len', '')} | {attention} | "
        head += f"{remat[0] if remat else 'full'} | "
        if "error" in r:
            lines.append(head + f"error: {r['error'][:80]} | | | | |")
            continue
        if not r["compiled"]:
            lines.append(head + f"| over {r['temp_bytes_per_chip'] / GiB:.2f} GiB | "
                         f"{r['hbm_bytes_per_chip'] / GiB:.0f} GiB | **no** | |")  # fmt: skip
            continue
        lines.append(
            head
            + f"{r['peak_bytes_per_chip'] / GiB:.2f} GiB | {r['temp_bytes_per_chip'] / GiB:.2f}"
            f" GiB | {r['hbm_bytes_per_chip'] / GiB:.0f} GiB | "
            f"{'yes' if r['fits'] else '**no**'} | {r['compile_seconds']:.0f} s |"
        )
    return "\n".join(lines)


# MaxText's `train_compile` peak per chip (GiB, `peak_memory_in_bytes` of the compiled step,
# as llamax's) for the same step: fsdp over every chip, 4,096 tokens, full remat, its
# dot_product attention against `xla` and its flash (splash) against `splash`. Measured on
# the development machine with the same libtpu 0.0.52, MaxText e591f30 (2026-11-29).
MAXTEXT = {
    ("llama2_7b", "v5e-16", 1, "xla"): 11.06,
    ("llama2_7b", "v5e-16", 1, "splash"): 9.03,
    ("llama2_7b", "v5e-256", 4, "splash"): 7.08,
    ("llama2_70b", "v5p-64", 1, "xla"): 47.89,
}


def _versus_maxtext(results) -> str:
    lines = [
        "| config | slice | batch / chip | attention | MaxText | llamax | llamax / MaxText |",
        "|---|---|---|---|---|---|---|",
    ]
    for case, theirs in MAXTEXT.items():
        r = results.get(case)
        if r and "error" not in r and r["compiled"]:
            ours = r["peak_bytes_per_chip"] / GiB
            name, tpu, per_device, attention = case
            lines.append(f"| {name} | {tpu} | {per_device} | {attention} | {theirs:.2f} GiB | "
                         f"{ours:.2f} GiB | {ours / theirs:.3f} |")  # fmt: skip
    return (
        "Side by side with MaxText's `train_compile` (fsdp over every chip, 4,096 tokens, full "
        "remat; its dot_product attention against `xla`, its flash (splash) against `splash`), "
        "peak per chip, the same measure for both (`peak_memory_in_bytes`; MaxText e591f30, "
        "the same libtpu):\n\n" + "\n".join(lines) + "\n\n" + WHERE_IT_WENT
    )


WHERE_IT_WENT = """\
Where the memory went, from the compiled steps' buffer assignments (libtpu writes them for
`XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_as_text"`; MaxText's were dumped the same
way) and the live ranges around each step's peak:

- **The logits.** llamax's loss took the whole `[B, T, V]` logits in float32 and kept them
  with a bfloat16 copy for the backward pass: 1.95 + 0.98 GiB per chip at 4 sequences of
  4,096 tokens. MaxText keeps the bfloat16 logits (1 GiB there). The loss now runs the
  output projection and the softmax over chunks of 512 positions with a backward pass of
  its own (`llamax.model.output_nll`, [model.md](model.md)), and no logits are whole:
  7B on v5e-256 went from 7.89 to 7.05 GiB, 7B on v5e-16 from 10.96 to 10.62 (`xla`) and
  from 9.34 to 9.00 (`splash`), 70B on v5p-64 from 48.14 to 47.86.
- **A bfloat16 copy of every layer's weights.** libtpu's bfloat16-propagation pass moves each
  layer's cast of its float32 weights out of the layer loop: one bfloat16 copy of all the
  stacked weights, made before the forward pass and held until the backward pass ends (its
  pass-by-pass dump shows the copy first after `bfloat16-propagation`). MaxText's step
  holds the same copy (4 GiB per chip for 70B on v5p-64). llamax compiles its steps for
  TPU with that pass off (`llamax.execution.TPU_COMPILER_OPTIONS`; the pass never changes a
  result, so neither does turning it off): 7B on v5e-16 down by 0.75 GiB, 70B on v5p-64
  from 47.86 to 43.88 GiB. Test: `test_aot.py::test_no_bfloat16_copy_of_every_layer_is_held`.
- **What is left.** Every step's peak is now in the backward pass of a layer: the saved
  inputs of all layers (bfloat16 `[layers, B, T, D]`: 4 GiB at 4 sequences of 4,096 on
  v5e-256, 5 GiB for 70B), float32 gradients, and one layer's temporaries (three
  `[B, T, F]` bfloat16 MLP buffers, the attention's q, k, v and their gradients). MaxText's
  step holds the same, buffer for buffer, so the 4-sequence v5e-256 row, where the weights
  per chip are small, stays near 1.0x; the rows where the weights weigh are near 0.9x."""


def _row(case, make_config, make_command, check=aot.check, bench="tpu_fit") -> dict:
    """One compiled row (`check`: `aot.check`, or `aot.check_ppo`), printed as a JSON line; a
    row that cannot compile is reported, not fatal."""
    try:
        r = check(make_config(*case), case[1])
    except Exception as e:
        r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    r.update(config=case[0], command=make_command(*case))
    print(json.dumps({"bench": bench, **r}), flush=True)
    return r


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="", help="run the rows whose config contains this")
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "tpu_fit.md"))
    parser.add_argument(
        "--ppo", action="store_true",
        help="only the PPO rows: their section of --out is replaced in place",
    )  # fmt: skip
    args = parser.parse_args()
    if args.ppo:
        with open(args.out) as f:
            text = f.read()
        rows = [(case, _ppo_row(case)) for case in PPO_CASES if args.only in case[0]]
        text = replace_section(text, "## PPO", ppo_section(rows))
        tmp = f"{args.out}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.out)
        return
    tables, commands, results = [], [], {}
    kinds = [(CASES, config_for, command), (REMAT_CASES, config_for, command),
             (FINETUNE_CASES, config_for, command),
             (CONTEXT_CASES, context_config, context_command)]  # fmt: skip
    for cases, make_config, make_command in kinds:
        rows = []
        for case in (c for c in cases if args.only in c[0]):
            r = _row(case, make_config, make_command)
            rows.append((case, r))
            results[case] = r
            commands.append(f"    {r['command']}")
        tables.append(rows)
    ppo = ppo_section([(case, _ppo_row(case)) for case in PPO_CASES if args.only in case[0]])
    table, remat_table, finetune_table = (_table(rows) for rows in tables[:3])
    context_table = _context_table(tables[3])
    maxtext = _versus_maxtext(results)
    when = time.strftime("%Y-%m-%d")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}"
    text = f"""# TPU fit table

Generated by `.venv/bin/python bench/tpu_fit.py` on {when} ({machine}, libtpu from PyPI): the
real train step of each config compiled ahead of time for the slice
([llamax/aot.py](../llamax/aot.py)), fsdp over every chip, one micro-batch per step
(`grad_accum_steps=1`), bfloat16 compute, full remat, AdamW state in float32. "peak / chip" is
XLA's `memory_analysis()` of the compiled program: arguments, temporaries and outputs, less
what the donated state aliases.

{table}

v5p slices compile every time. Earlier, `llamax-aot` failed for most v5p programs with
`RET_CHECK failure ... async-update instruction should have 1 operands but sees 3`. The
compile itself had succeeded; the failure came after it, when llamax read the compiled
program back as text to count its Pallas kernels. JAX's XLA then parses libtpu's HLO, and
libtpu 0.0.52's v5p schedules hold async-update instructions of 3 operands, where JAX's XLA
accepts 1. Whether a schedule had one varied from run to run, so the failure did too. The
kernels are now counted in the lowered program, before compiling (`llamax/aot.py`). The
same step compiled with the XLA options that MaxText's v5p recipes set about async
collective fusion (`xla_tpu_enable_async_collective_fusion`, `..._fuse_all_gather`,
`..._multiple_steps`), each switched off in turn, gave the same peak.

{maxtext}

## Context parallelism: 32k tokens with fewer sequences than chips

Llama 2 7B at 32,768 tokens, 64 sequences per step (Chen et al.'s batch), full remat, `auto`
attention (`chunked` on TPU with `mesh.context > 1`: splash does not split the sequence);
the last row is the recipe's own run, splash without the context axis:

{context_table}

With fsdp alone, 64 sequences of 32k cannot use more than 64 chips; with `context` the same
batch spreads over 256 v5e chips, each holding a quarter of one sequence.

## Remat policies

The memory side of the trade-off, 7B on v4-32 with 1 sequence per chip: `full` saves only
each layer's input and recomputes the whole layer in the backward pass (one extra forward,
about a third more FLOPs per step); the others keep more activations to recompute less
(`save_qkv_proj`: the q, k, v projections; `dots_no_batch`: weight matmul outputs; `dots`:
every matmul output; `none`: everything).

{remat_table}

## Fine-tuning

Chat SFT trains every parameter: the pretraining step with other data. LoRA trains adapters
of rank 64 on every layer matrix (configs/llama2_7b_lora.py, the QLoRA paper's settings) with
optimizer state for them alone, over the frozen base in bfloat16 or with int8 or 4-bit NF4
matrices (`lora.base_dtype`, docs/finetuning.md; configs/llama2_7b_qlora_nf4.py is QLoRA's
recipe); `init_from` is never read by a compile. Attention `auto` (splash):

{finetune_table}

The int8 base puts 7B LoRA with 4,096-token sequences on one 16 GiB v5e chip; the bfloat16
base needs more than one chip. The NF4 base (QLoRA's recipe) holds the matrices at 4.5 bits
a weight instead of 8: smaller arguments than int8's, the same temporaries.

{ppo}
Each row, reproduced:

{chr(10).join(commands)}
"""
    tmp = f"{args.out}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
