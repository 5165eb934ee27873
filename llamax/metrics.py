"""Model FLOPs, MFU, the writers for `metrics.jsonl` and TensorBoard, and `TrainLog`: a
training loop's bookkeeping (step metrics fetched in bulk, throughput, progress, log lines).

FLOPs per token are MaxText's accounting for training (forward and backward, 3 x 2 FLOPs per
multiply-accumulate): `6 * (matmul parameters outside the embedding lookup + vocab * dim)`
for the projections and the output layer, plus `6 * n_layers * seq_len * dim` for the
attention scores and the weighted sum, halved because attention is causal; a task whose step
runs more forward passes (DPO's reference) counts them (`llamax.tasks`). MFU divides the
model FLOPs per second by the devices' dense bfloat16 peak.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping

import jax
import numpy as np

from llamax import fs
from llamax.config import LlamaConfig

log = logging.getLogger("llamax")

# Dense bfloat16 peak FLOP/s per device (one chip; one GPU), by a prefix of `device_kind`.
# TPU v4 and v5p devices are one chip each (two TensorCores in megacore mode).
PEAK_FLOPS: dict[str, float] = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    # NVIDIA: dense bf16 tensor-core peaks of the datasheets (half the "with sparsity" ones),
    # by the names CUDA reports ("NVIDIA H100 80GB HBM3" is the SXM part).
    "NVIDIA H100": 989e12,  # SXM
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,  # SXM: the H100's compute with more and faster memory
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA GH200": 989e12,
    "NVIDIA A100": 312e12,  # SXM4 and PCIe alike
    "NVIDIA L4": 121e12,
    "NVIDIA L40": 181e12,  # (so that the L4's prefix does not claim the L40 and L40S)
    "NVIDIA L40S": 362e12,
    "NVIDIA B200": 2250e12,
}


def flops_per_token(config: LlamaConfig, seq_len: int, forwards: float = 3) -> float:
    """FLOPs per token of `forwards` forward passes of the model at this sequence length, a
    backward pass counting as two: 3 is a training step's (forward + backward); a step that
    also runs a model beside it forward (DPO's reference) counts 4."""
    head = config.vocab_size * config.dim if config.head == "lm" else config.dim  # score: [D, 1]
    matmul_params = config.n_layers * config.layer_matmul_params + head
    causal_attention = 2 * config.n_layers * seq_len * config.dim  # 4 * L * T * D, halved
    return forwards * (2 * matmul_params + causal_attention)


def peak_flops_per_device(device: jax.Device | None = None, override: float = 0.0) -> float | None:
    """The device's bf16 peak from the table (longest matching prefix), `override` if positive,
    None when unknown (CPUs: MFU is then not reported unless a peak is given)."""
    if override > 0:
        return float(override)
    return peak_flops((device or jax.devices()[0]).device_kind)


def peak_flops(device_kind: str) -> float | None:
    """The table's peak for a device name (JAX's `device_kind`, or CUDA's name, the same for
    NVIDIA GPUs): the entry of the longest prefix, None for none."""
    matches = [k for k in PEAK_FLOPS if device_kind.startswith(k)]
    return PEAK_FLOPS[max(matches, key=len)] if matches else None


SYNC_SECONDS = 30  # the longest a workdir on object storage lags the metrics


class MetricsWriter:
    """Appends one JSON object per logged step to `metrics.jsonl` and writes the same scalars
    as TensorBoard events. Only process 0 writes; on other processes every call is a no-op."""

    def __init__(self, workdir: str, start_step: int = 0, enabled: bool | None = None):
        """Records after `start_step` already in `metrics.jsonl` are from a run that did not
        reach its next checkpoint (or from an earlier run, when starting from scratch): they
        are dropped, so the file never holds a step twice. With the workdir on object
        storage, both are written to a local mirror uploaded every `SYNC_SECONDS`, with each
        checkpoint (`flush`) and at the end."""
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = fs.join(workdir, "metrics.jsonl")
        self._tb = self._mirror = None
        if self.enabled:
            self._mirror = fs.Mirror(workdir, fetch=("metrics.jsonl",))
            self._local = os.path.join(self._mirror.local, "metrics.jsonl")
            if os.path.exists(self._local):
                kept = [r for r in read_metrics(self._mirror.local) if r["step"] <= start_step]
                fs.write_lines(self._local, [json.dumps(r) + "\n" for r in kept])
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(self._mirror.local, "tensorboard"), flush_secs=30)
            self._synced_at = time.monotonic()

    def write(self, step: int, scalars: Mapping[str, float | int | None]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}
        with open(self._local, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                self._tb.add_scalar(key, value, int(step))
        if time.monotonic() - self._synced_at > SYNC_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Everything written so far is in the workdir."""
        if self.enabled:
            self._tb.flush()
            self._mirror.sync()
            self._synced_at = time.monotonic()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._mirror.close()


def _plain(value):
    if value is None or isinstance(value, str | int):
        return value
    value = float(value)
    return value if value == value and abs(value) != float("inf") else str(value)


def read_metrics(workdir: str) -> list[dict]:
    """The records of `metrics.jsonl`, in order."""
    with fs.open(fs.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def show_progress(progress_bar: bool) -> bool:
    """Whether a loop shows a tqdm bar: when asked (`train.progress_bar`), on process 0, and
    with stderr a terminal; a log file gets plain lines instead of a bar's carriage returns."""
    return bool(progress_bar) and jax.process_index() == 0 and sys.stderr.isatty()


def parameter_counts(setup) -> str | None:
    """The line of a LoRA run's parameters (None without LoRA), as PEFT's `trainable params`:
    what trains (the adapters, and what trains beside them: a reward model's score head), its
    share of the model's parameters with the adapters, and how the frozen base is stored."""
    from llamax import lora

    if setup.model.lora is None:
        return None

    def count(tree) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))

    trainable = count(setup.abstract.params)
    beside, adapters = lora.split(setup.abstract.params)
    total = setup.model.config.num_params() + count(adapters)
    besides = f" and {', '.join(sorted(beside))} beside them" if beside else ""
    return (
        f"LoRA: {trainable:,} trainable parameters ({trainable / total:.2%} of {total:,}: "
        f"{count(adapters):,} in the adapters{besides}); frozen base in "
        f"{setup.c.lora.base_dtype}"
    )


class TrainLog:
    """A training loop's metrics: each step's device values are queued without waiting for
    them and fetched together at a log or save step; tokens/s, TFLOP/s and MFU are measured
    between logged steps (from the end of the first step, which compiles); records go to
    `metrics.jsonl`, TensorBoard and a line on the console. On process 0 with stderr a
    terminal and `train.progress_bar`, a tqdm bar too (`show_progress`), started at the end
    of the first step, so that its rate and ETA are the steady steps' and not the compile's;
    otherwise the logged steps' plain lines only."""

    def __init__(self, workdir: str, setup, start_step: int, tokens_per_step: int | None = None):
        """`setup`: a `llamax.setup.Setup`, whose task gives the FLOPs per token and the step
        metrics shown; `tokens_per_step`: the tokens a logged step trains on (default: one
        global batch)."""
        c, t = setup.c, setup.c.train
        config, mesh = setup.model.config, setup.mesh
        self.tokens_per_step = tokens_per_step or t.batch_size * t.seq_len
        self.num_devices = mesh.devices.size
        self.flops_token = setup.task.flops_per_token(c, config)
        self.shown = setup.task.shown
        self.peak = peak_flops_per_device(mesh.devices.flat[0], t.peak_flops_per_device)
        self.writer = MetricsWriter(workdir, start_step=start_step)
        self.is_main = jax.process_index() == 0
        self.pending: list[tuple[int, dict]] = []
        self.timer_start, self.timer_step = None, start_step
        self.progress, self.total_steps = None, t.steps
        self.bar_wanted = show_progress(t.progress_bar)
        if self.is_main:
            log.info(
                "model (%s preset%s): %s parameters; mesh %s over %d devices (%d processes); "
                "%.3f GFLOP per token",
                c.model.preset,
                " with overrides" if config != LlamaConfig.preset(c.model.preset) else "",
                f"{config.num_params():,}",
                dict(mesh.shape),
                self.num_devices,
                jax.process_count(),
                self.flops_token / 1e9,
            )
            lora_line = parameter_counts(setup)
            if lora_line:
                log.info("%s", lora_line)

    def add(self, step: int, metrics: dict) -> None:
        """Queues the metrics of a finished step (device arrays; not waited for)."""
        self.pending.append((step, metrics))
        if self.timer_start is None:  # the first step compiles: time from its end
            jax.block_until_ready(metrics)
            self.timer_start, self.timer_step = time.perf_counter(), step
            if self.bar_wanted:
                from tqdm import tqdm

                self.progress = tqdm(
                    total=self.total_steps, initial=step, desc="train", unit="step",
                    dynamic_ncols=True, file=sys.stderr,
                )  # fmt: skip
        elif self.progress is not None:
            self.progress.update(1)

    def fetch(self, resume_from: int | None) -> dict:
        """The queued steps' values, checked before the caller saves anything: a non-finite
        loss, gradient norm or parameter norm (a NaN update) raises `FloatingPointError`,
        naming the step a rerun resumes from (`resume_from`, the last checkpoint written or
        being written). Returns the last step's values."""
        fetched = jax.device_get(self.pending)
        self.pending.clear()
        for at, m in fetched:
            values = (m["loss"], m["grad_norm"], m["param_norm"])
            if not np.all(np.isfinite(values)):
                then = (
                    f"resumes from the checkpoint of step {resume_from}, the last good one"
                    if resume_from else "starts afresh (no checkpoint was saved)"
                )  # fmt: skip
                raise FloatingPointError(
                    f"Step {at} is not finite (loss {m['loss']:.4g}, grad norm "
                    f"{m['grad_norm']:.4g}, parameter norm {m['param_norm']:.4g}): stopped "
                    f"before saving it. A rerun {then}. Lower optimizer.learning_rate, raise "
                    "optimizer.warmup_steps, or use float32 compute to find the cause."
                )
        return fetched[-1][1]

    def write(self, step: int, m: dict, evaluation: Mapping[str, float] | None = None) -> dict:
        """The record of a logged step: its values, the throughput since the last record, and
        the scalars of a held-out `evaluation` ({"eval_loss": ...}) when one ran."""
        elapsed = time.perf_counter() - self.timer_start
        steps = step - self.timer_step
        tokens_per_second = steps * self.tokens_per_step / elapsed if steps else None
        record = {
            "loss": float(m["loss"]),
            "learning_rate": float(m["learning_rate"]),
            "grad_norm": float(m["grad_norm"]),
            "param_norm": float(m["param_norm"]),
            # The step's predicted tokens in the loss (fine-tuning: the answers' only).
            "target_tokens": int(m["target_tokens"]),
            "tokens_per_second": tokens_per_second,
            "tflops_per_device": None,
            "mfu": None,
            # A task's own means (a reward model's accuracy, DPO's margins): llamax.losses.
            **{k: float(v) for k, v in m.items() if k not in _STEP_METRICS},
        }
        if tokens_per_second:
            flops = tokens_per_second * self.flops_token / self.num_devices
            record["tflops_per_device"] = flops / 1e12
            record["mfu"] = flops / self.peak if self.peak else None
        record.update(evaluation or {})
        self.writer.write(step, record)
        if self.is_main:
            line = format_record(step, record, self.shown, tuple(evaluation or ()))
            self.progress.write(line) if self.progress is not None else log.info("%s", line)
        self.timer_start, self.timer_step = time.perf_counter(), step
        return record

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.writer.close()

    def summarize(self) -> None:
        """Logs how far the loss fell over the whole run (`metrics.jsonl`)."""
        if self.is_main and self.writer.enabled and fs.exists(self.writer.path):
            records = read_metrics(os.path.dirname(self.writer.path))
            if records:
                log.info("%s", summarize(records))


_STEP_METRICS = ("loss", "learning_rate", "grad_norm", "param_norm", "target_tokens")


def format_record(step: int, r: dict, shown: tuple[str, ...] = (),
                  evaluation: tuple[str, ...] = ("eval_loss",)) -> str:  # fmt: skip
    """The console line of a record: loss, learning rate, gradient norm, throughput, the
    held-out `evaluation` scalars present, and a task's `shown` step metrics."""
    line = f"step {step}: loss {r['loss']:.4f}  lr {r['learning_rate']:.2e}"
    line += f"  grad_norm {r['grad_norm']:.3f}"
    if r["tokens_per_second"]:
        line += f"  {r['tokens_per_second']:,.0f} tokens/s"
    if r["mfu"] is not None:
        line += f"  MFU {100 * r['mfu']:.1f}%"
    for name in evaluation:
        if name in r:
            line += f"  {name} {r[name]:.4f}"
    for name in shown:
        if name in r:
            line += f"  {name} {r[name]:.3f}"
    return line


def summarize(records: list[dict]) -> str:
    """One line for the end of a run: how far the loss fell."""
    first, last = records[0], records[-1]
    line = f"trained to step {last['step']}: loss {first['loss']:.4f} (step {first['step']})"
    line += f" -> {last['loss']:.4f}"
    evals = [r for r in records if "eval_loss" in r]
    if evals:
        line += f"; eval loss {evals[0]['eval_loss']:.4f} (step {evals[0]['step']})"
        line += f" -> {evals[-1]['eval_loss']:.4f}"
    return line
