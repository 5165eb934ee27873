"""Model FLOPs, MFU, and the writers for `metrics.jsonl` and TensorBoard.

FLOPs per token are MaxText's accounting for training (forward and backward, 3 x 2 FLOPs per
multiply-accumulate): `6 * (matmul parameters outside the embedding lookup + vocab * dim)`
for the projections and the output layer, plus `6 * n_layers * seq_len * dim` for the
attention scores and the weighted sum, halved because attention is causal. MFU divides the
model FLOPs per second by the devices' dense bfloat16 peak.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax

from llamax.config import LlamaConfig

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
    "NVIDIA H100": 989e12,  # SXM; dense, without sparsity
    "NVIDIA A100": 312e12,
}


def flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of the model at this sequence length."""
    d, f, h = config.dim, config.hidden_dim, config.head_dim
    attention_proj = d * h * (2 * config.n_heads + 2 * config.kv_heads)
    matmul_params = config.n_layers * (attention_proj + 3 * d * f) + config.vocab_size * d
    causal_attention = 6 * config.n_layers * seq_len * d  # 12 * L * T * D, halved
    return 6 * matmul_params + causal_attention


def peak_flops_per_device(device: jax.Device | None = None, override: float = 0.0) -> float | None:
    """The device's bf16 peak from the table (longest matching prefix), `override` if positive,
    None when unknown (CPUs: MFU is then not reported unless a peak is given)."""
    if override > 0:
        return float(override)
    kind = (device or jax.devices()[0]).device_kind
    matches = [k for k in PEAK_FLOPS if kind.startswith(k)]
    return PEAK_FLOPS[max(matches, key=len)] if matches else None


class MetricsWriter:
    """Appends one JSON object per logged step to `metrics.jsonl` and writes the same scalars
    as TensorBoard events. Only process 0 writes; on other processes every call is a no-op."""

    def __init__(self, workdir: str, start_step: int = 0, enabled: bool | None = None):
        """Records after `start_step` already in `metrics.jsonl` are from a run that did not
        reach its next checkpoint (or from an earlier run, when starting from scratch): they
        are dropped, so the file never holds a step twice."""
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            if os.path.exists(self.path):
                kept = [r for r in read_metrics(workdir) if r["step"] <= start_step]
                tmp = self.path + ".tmp"
                with open(tmp, "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in kept)
                os.replace(tmp, self.path)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=30)

    def write(self, step: int, scalars: Mapping[str, float | int | None]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                self._tb.add_scalar(key, value, int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _plain(value):
    if value is None or isinstance(value, str | int):
        return value
    value = float(value)
    return value if value == value and abs(value) != float("inf") else str(value)


def read_metrics(workdir: str) -> list[dict]:
    """The records of `metrics.jsonl`, in order."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
