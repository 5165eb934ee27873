"""Ahead-of-time fit checks: compile the real train step for a TPU slice on any machine.

With `libtpu` installed (`pip install 'llamax[tpu]'`), JAX describes any TPU topology without
the hardware (`jax.experimental.topologies`) and XLA compiles for it; the compiled program's
`memory_analysis()` gives what each chip would hold. `check(c, "v5e-16")` compiles the train
step of `llamax.setup.build` for the experiment config `c` on that slice (its task's step:
fields, loss and the models beside it, whatever the task), with the config's mesh over the
slice's chips, and reports per-chip memory against the chip's HBM, whether it fits, the
compile time and the model FLOPs per step (the task's).

Slice names are Google Cloud's: `v4-N` and `v5p-N` count TensorCores (two per chip, one JAX
device per chip), `v5e-N` (gcloud's `v5litepod-N`, also accepted) and `v6e-N` count chips.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import time

import jax
import ml_collections

from llamax import attention, setup, sharding

GiB = 2**30
# Per chip: HBM bytes, JAX topology generation name, chip config, chips per host.
CHIPS = {
    "v4": (32 * GiB, "v4", "megacore", (2, 2, 1)),
    "v5p": (95 * GiB, "v5p", "megacore", (2, 2, 1)),
    "v5e": (16 * GiB, "v5e", "default", (2, 2, 1)),
    "v6e": (32 * GiB, "v6e", "default", (2, 2, 1)),
}
# Chip grids by chip count: 2D tori (v5e, v6e) and 3D (v4, v5p), as Google Cloud lays them out.
GRIDS_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
            128: (8, 16), 256: (16, 16)}  # fmt: skip
GRIDS_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
            128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
            2048: (8, 16, 16), 4096: (16, 16, 16)}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str
    generation: str
    chips: int
    grid: tuple[int, ...]
    hbm_bytes: int

    @property
    def topology(self) -> str:
        return f"{CHIPS[self.generation][1]}:{'x'.join(map(str, self.grid))}"

    @property
    def accelerator_type(self) -> str:
        """gcloud's `--accelerator-type` for this slice."""
        count = self.name.partition("-")[2]
        return f"v5litepod-{count}" if self.generation == "v5e" else f"{self.generation}-{count}"


def parse_slice(name: str) -> Slice:
    """`v5e-16` (or `v5litepod-16`) -> 16 v5e chips on a 4x4 grid; clear errors for anything
    else."""
    if name.startswith("v5litepod-"):
        name = "v5e-" + name.removeprefix("v5litepod-")
    generation, _, count = name.partition("-")
    if generation not in CHIPS or not count.isdigit():
        raise ValueError(
            f"Unknown TPU slice {name!r}: expected v4-N, v5p-N (TensorCores), v5e-N or v6e-N "
            "(chips), e.g. v5e-16 or v5p-128"
        )
    n = int(count)
    chips = n // 2 if generation in ("v4", "v5p") else n
    grids = GRIDS_3D if generation in ("v4", "v5p") else GRIDS_2D
    if chips not in grids or (generation in ("v4", "v5p") and n % 2):
        sizes = sorted(c * 2 if generation in ("v4", "v5p") else c for c in grids)
        raise ValueError(f"No {generation} slice of {n}: Google Cloud's sizes are {sizes}")
    return Slice(name, generation, chips, grids[chips], CHIPS[generation][0])


def topology_devices(tpu: Slice, num_slices: int = 1) -> list:
    from jax.experimental import topologies

    # Compiling uses no TPU, so several processes may load libtpu at once (it otherwise
    # takes a machine-wide lock).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if not glob.glob("/dev/accel*") and not os.path.exists("/dev/vfio"):
        # Not a TPU VM: tell libtpu so, or it asks the metadata server which TPU it runs on
        # and prints errors about the answer it cannot get.
        for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_ID", "0"),
                           ("TPU_WORKER_HOSTNAMES", "localhost"),
                           ("TPU_ACCELERATOR_TYPE", tpu.accelerator_type)):  # fmt: skip
            os.environ.setdefault(key, value)

    _, _, chip_config, host_bounds = CHIPS[tpu.generation]
    # A slice smaller than a host (v5e-1) is a host of fewer chips.
    grid = (*tpu.grid, 1, 1)[:3]
    host_bounds = tuple(min(h, g) for h, g in zip(host_bounds, grid, strict=True))
    try:
        desc = topologies.get_topology_desc(
            tpu.topology, "tpu", chip_config_name=chip_config,
            chips_per_host_bounds=host_bounds, num_slices=num_slices,
        )  # fmt: skip
    except Exception as e:  # jax raises several types when libtpu is missing or refuses
        raise RuntimeError(
            f"Cannot describe TPU topology {tpu.topology} ({e}); ahead-of-time checks need "
            "libtpu: pip install 'llamax[tpu]'"
        ) from e
    return list(desc.devices)


def _mesh(c: ml_collections.ConfigDict, slice_name: str, num_slices: int):
    tpu = parse_slice(slice_name)
    devices = topology_devices(tpu, num_slices)
    try:
        return tpu, setup.make_mesh(c, devices)
    except ValueError as e:
        raise ValueError(
            f"The config's mesh data={c.mesh.data} fsdp={c.mesh.fsdp} context={c.mesh.context} "
            f"tensor={c.mesh.tensor} does not fit {num_slices} x {slice_name} "
            f"({len(devices)} chips): {e}"
        ) from e


def check(
    c: ml_collections.ConfigDict, slice_name: str, num_slices: int = 1
) -> dict[str, float | int | bool | str | dict]:
    """Compiles the train step of config `c` for `num_slices` slices of `slice_name`; the
    per-chip memory report (bytes), whether it fits, compile seconds, model FLOPs per step."""
    tpu, mesh = _mesh(c, slice_name, num_slices)
    return _compiled_step(setup.build(c, mesh), tpu, slice_name, num_slices)


def _compiled_step(s: setup.Setup, tpu: Slice, slice_name: str, num_slices: int) -> dict:
    """`check`'s report of the train step of `s` (built on a topology's mesh)."""
    c, mesh = s.c, s.mesh
    config, run = s.model.config, s.model.execution
    start = time.perf_counter()
    try:
        with sharding.use_mesh(mesh), attention.compiling_for("tpu"):
            lowered = s.train_step.lower(s.abstract_state(), s.abstract_batch())
            # Pallas kernels lowered to Mosaic (splash attention), as calls in the program.
            # Counted before compiling: reading the compiled program back (`as_text`) makes
            # JAX's XLA parse libtpu's HLO, which fails for v5p programs (libtpu 0.0.52 emits
            # async-update instructions of 3 operands; JAX's XLA accepts 1), though the
            # compile itself succeeded.
            kernels = lowered.as_text().count("tpu_custom_call")
            compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        # XLA refuses to compile a program whose temporaries alone exceed the HBM.
        needed = re.search(r"HLO temporaries \(([\d.]+)G\)", str(e))
        if "CompileTimeHbmOom" not in str(e) or not needed:
            raise
        compiled, temporaries = None, int(float(needed.group(1)) * GiB)
    seconds = time.perf_counter() - start
    if compiled is None:
        memory = dict(argument=0, output=0, temp=temporaries, alias=0)
        peak = temporaries
    else:
        analysis = compiled.memory_analysis()
        memory = {k: getattr(analysis, f"{k}_size_in_bytes") for k in
                  ("argument", "output", "temp", "alias")}  # fmt: skip
        peak = getattr(analysis, "peak_memory_in_bytes", 0) or (
            memory["argument"] + memory["output"] + memory["temp"] - memory["alias"]
        )
    total = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
    tokens_per_step = c.train.batch_size * c.train.seq_len
    flops_token = s.task.flops_per_token(s.c, config)
    return {
        "topology": slice_name,
        "num_slices": num_slices,
        "chips": mesh.devices.size,
        "mesh": dict(mesh.shape),
        "per_device_batch": c.train.batch_size / (mesh.shape["data"] * mesh.shape["fsdp"]),
        "seq_len": c.train.seq_len,
        "attention": run.attention,
        "remat_policy": run.remat_policy,
        # When XLA refused to compile (temporaries over the HBM), only the temporaries it
        # asked for are known, and the peak is at least that.
        "compiled": compiled is not None,
        "argument_bytes_per_chip": memory["argument"],
        "output_bytes_per_chip": memory["output"],
        "temp_bytes_per_chip": memory["temp"],
        "alias_bytes_per_chip": memory["alias"],
        "peak_bytes_per_chip": int(peak),
        # What MaxText's train_compile prints as its total: every buffer as if live at once.
        "total_bytes_per_chip": total,
        "hbm_bytes_per_chip": tpu.hbm_bytes,
        "fits": compiled is not None and peak <= tpu.hbm_bytes,
        "compile_seconds": round(seconds, 1),
        "mosaic_kernel_calls": kernels,
        "model_flops_per_step": flops_token * tokens_per_step,
        "parameters": config.num_params(),
    }


def bytes_per_chip(tree) -> int:
    """The bytes one chip holds of a tree of abstract arrays placed on their shardings (the
    largest shard, for a layout that splits unevenly)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        total += math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    return total


def check_ppo(
    c: ml_collections.ConfigDict, slice_name: str, num_slices: int = 1
) -> dict[str, float | int | bool | str | dict]:
    """PPO's iteration (`task = "ppo"`, `llamax.ppo_train`) on a slice: what every chip holds
    in each of its phases, the largest of them its peak.

    - the policy's update: its train step compiled (`check`: its state, the models beside it,
      the reference and the reward models, its temporaries), with the value model's whole
      state resident beside it;
    - the value model's update: the same, the other way round;
    - the rollouts: both states resident, the engine's copy of the policy's weights (the
      trainable and frozen trees, laid out as training lays them out) and the decode state of
      `ppo.rollout_slots` slots of the full row (`train.seq_len`), compiled for the slice.
      The decode step's own temporaries (a token's attention and logits a slot) and the
      scoring forwards' (smaller than a train step's) are not counted.

    Resident states are exact (their shapes and shardings); the report keeps each phase's
    bytes, and `fits` is the peak within the chip's HBM."""
    from llamax import inference, ppo_train  # ppo_train: the value model's config

    tpu, mesh = _mesh(c, slice_name, num_slices)
    policy = setup.build(c, mesh)
    value = setup.build(ppo_train.value_config(c), mesh)
    reports = {
        name: _compiled_step(s, tpu, slice_name, num_slices)
        for name, s in (("policy", policy), ("value", value))
    }
    states = {
        name: bytes_per_chip(s.abstract_state())
        for name, s in (("policy", policy), ("value", value))
    }
    weights = policy.abstract_state()
    engine_copy = bytes_per_chip((weights.params, weights.frozen))
    slots, length = c.ppo.rollout_slots or c.ppo.rollouts, c.train.seq_len
    config, run = policy.model.config, policy.model.execution
    with sharding.use_mesh(mesh), attention.compiling_for("tpu"):
        decode = inference.lower_new_state(config, slots, length, run.dtype).compile()
        decode_state = decode.memory_analysis().output_size_in_bytes
    phases = {
        "policy update": reports["policy"]["peak_bytes_per_chip"] + states["value"],
        "value update": reports["value"]["peak_bytes_per_chip"] + states["policy"],
        "rollouts": states["policy"] + states["value"] + engine_copy + decode_state,
    }
    peak = max(phases.values())
    compiled = all(r["compiled"] for r in reports.values())
    return {
        "topology": slice_name, "num_slices": num_slices, "chips": reports["policy"]["chips"],
        "mesh": dict(mesh.shape), "seq_len": length, "rollouts": c.ppo.rollouts,
        "rollout_slots": slots, "lora_rank": c.lora.rank,
        "policy_state_bytes_per_chip": states["policy"],
        "value_state_bytes_per_chip": states["value"],
        "engine_copy_bytes_per_chip": engine_copy, "decode_state_bytes_per_chip": decode_state,
        "phase_bytes_per_chip": phases, "peak_bytes_per_chip": peak,
        "hbm_bytes_per_chip": tpu.hbm_bytes, "compiled": compiled,
        "fits": compiled and peak <= tpu.hbm_bytes,
        "compile_seconds": round(sum(r["compile_seconds"] for r in reports.values()), 1),
        "steps": reports,
    }  # fmt: skip


def format_ppo_report(r: dict) -> str:
    gib = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
    phases = ", ".join(f"{k} {gib(v)}" for k, v in r["phase_bytes_per_chip"].items())
    return "\n".join([
        f"{r['num_slices']} x {r['topology']} ({r['chips']} chips), mesh {r['mesh']}, PPO: "
        f"{r['rollouts']} rollouts of {r['seq_len']} tokens, {r['rollout_slots']} decode slots"
        + (f", LoRA r{r['lora_rank']}" if r["lora_rank"] else ""),
        f"  per chip: policy state {gib(r['policy_state_bytes_per_chip'])}, value state "
        f"{gib(r['value_state_bytes_per_chip'])}, the engine's copy "
        f"{gib(r['engine_copy_bytes_per_chip'])}, decode state "
        f"{gib(r['decode_state_bytes_per_chip'])}",
        f"  phases: {phases}",
        f"  peak {gib(r['peak_bytes_per_chip'])} of {gib(r['hbm_bytes_per_chip'])} HBM: "
        + ("fits" if r["fits"] else "DOES NOT FIT"),
    ])  # fmt: skip


def format_report(r: dict) -> str:
    gib = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
    if not r["compiled"]:
        return (
            f"{r['num_slices']} x {r['topology']} ({r['chips']} chips), mesh {r['mesh']}: "
            f"DOES NOT FIT: XLA asks for {gib(r['temp_bytes_per_chip'])} of temporaries per chip "
            f"alone ({gib(r['hbm_bytes_per_chip'])} HBM)"
        )
    context = r["mesh"].get("context", 1)
    share = f", each split over {context} chips" if context > 1 else " per device"
    lines = [
        f"{r['num_slices']} x {r['topology']} ({r['chips']} chips), mesh {r['mesh']}, "
        f"{r['per_device_batch']:g} x {r['seq_len']} tokens{share}, "
        f"attention {r['attention']}, remat {r['remat_policy']}",
        f"  per chip: arguments {gib(r['argument_bytes_per_chip'])}, temporaries "
        f"{gib(r['temp_bytes_per_chip'])}, output {gib(r['output_bytes_per_chip'])} "
        f"(aliased {gib(r['alias_bytes_per_chip'])})",
        f"  peak {gib(r['peak_bytes_per_chip'])} of {gib(r['hbm_bytes_per_chip'])} HBM: "
        + ("fits" if r["fits"] else "DOES NOT FIT"),
        f"  compiled in {r['compile_seconds']} s; {r['model_flops_per_step'] / 1e12:.1f} model "
        f"TFLOP per step ({r['parameters'] / 1e6:,.1f}M parameters)",
    ]
    return "\n".join(lines)
