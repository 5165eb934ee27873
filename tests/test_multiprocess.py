"""Two processes x 4 CPU devices, one JAX cluster over 127.0.0.1 (gloo collectives), train
exactly as one process x 8 devices."""

import numpy as np
import pytest
from conftest import load_config, start_cluster

from llamax import train
from llamax.metrics import read_metrics

OVERRIDES = {"train.steps": 4, "train.log_every": 1, "train.eval_every": 0,
             "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}  # fmt: skip
FLAGS = [f"--config.{k}={v}" for k, v in OVERRIDES.items()] + ["--config.train.progress_bar=false"]

pytestmark = pytest.mark.slow  # a cluster of two training processes


def test_two_processes_match_one(tmp_path):
    reference = load_config("tiny", **OVERRIDES)
    train.run(reference, str(tmp_path / "one"))
    want = [r["loss"] for r in read_metrics(str(tmp_path / "one"))]

    workdir = str(tmp_path / "two")
    procs = start_cluster(workdir, FLAGS)
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert "over 8 devices (2 processes)" in outputs[0]
    records = read_metrics(workdir)
    # Only process 0 writes: one record per step, not two.
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in records], want, rtol=1e-5)
