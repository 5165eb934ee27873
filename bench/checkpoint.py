"""How long a checkpoint save blocks the train loop (async) vs. the whole write.

    .venv/bin/python bench/checkpoint.py

A Llama of 92M parameters (dim 768, 6 layers, vocab 32000) with its AdamW state, float32:
about 1.1 GB. Each round saves the state with the async CheckpointManager the train loop uses,
timing the `save` call (what the loop waits for: the copy off the devices) and the time until
the checkpoint is complete on disk; then the same with a synchronous manager. Prints one JSON
line with the medians. Goal: blocked time under 10% of the write time.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time

import jax
import numpy as np

from llamax import checkpoint, experiment, setup

ROUNDS = 3


def main() -> None:
    c = experiment.default_config()
    c.task = "lm"
    c.model.update(preset="llama2-7b", dim=768, n_layers=6, n_heads=12)
    c.train.steps = 1000
    s = setup.build(c, setup.make_mesh(c, devices=jax.devices()[:1]))
    state = s.init_state(jax.random.key(0))
    nbytes = checkpoint.state_bytes(state)
    work = tempfile.mkdtemp(prefix="llamax-ckpt-")
    results = {}
    for mode in ("async", "sync"):
        c = checkpoint.default_config()
        c.async_save, c.keep = mode == "async", 1
        saves = checkpoint.Checkpoints(os.path.join(work, mode), c)
        blocked, total = [], []
        for step in range(1, ROUNDS + 1):
            start = time.perf_counter()
            saves.save(step, state, {"step": step}, {"step": step})
            blocked.append(time.perf_counter() - start)
            saves.finish_saving()
            total.append(time.perf_counter() - start)
        saves.close()
        results[mode] = (float(np.median(blocked)), float(np.median(total)))
    shutil.rmtree(work)
    blocked, written = results["async"]
    print(
        json.dumps(
            {
                "bench": "checkpoint",
                "state_bytes": nbytes,
                "async_blocked_seconds": round(blocked, 3),
                "async_write_seconds": round(written, 3),
                "blocked_fraction": round(blocked / written, 4),
                "sync_save_seconds": round(results["sync"][1], 3),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, local disk",
            }
        )
    )


if __name__ == "__main__":
    main()
