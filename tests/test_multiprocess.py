"""Two processes x 4 CPU devices, one JAX cluster over 127.0.0.1 (gloo collectives), train
exactly as one process x 8 devices, told their places by torchrun's variables (or flags:
tests/test_checkpoint.py, tests/test_failures.py); SLURM's variables give llamax-train the
cluster the flags would; and how the launchers' environments are read."""

import os

import numpy as np
import pytest
from conftest import load_config, start_cluster

from llamax import cluster, train
from llamax.metrics import read_metrics

OVERRIDES = {"train.steps": 4, "train.log_every": 1, "train.eval_every": 0,
             "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}  # fmt: skip
FLAGS = [f"--config.{k}={v}" for k, v in OVERRIDES.items()] + ["--config.train.progress_bar=false"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The losses of the run in one process of 8 devices."""
    workdir = str(tmp_path_factory.mktemp("one"))
    train.run(load_config("tiny", **OVERRIDES), workdir)
    return [r["loss"] for r in read_metrics(workdir)]


@pytest.mark.slow  # a cluster of two training processes
def test_two_processes_match_one(one_process, tmp_path):
    """The processes learn their places from torchrun's variables (`torchrun
    --nproc-per-node=2`): the place the environment gives works end to end."""
    want = one_process

    workdir = str(tmp_path / "two")
    procs = start_cluster(workdir, FLAGS, launcher="torchrun")
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert "over 8 devices (2 processes)" in outputs[0]
    records = read_metrics(workdir)
    # Only process 0 writes: one record per step, not two.
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in records], want, rtol=1e-5)


@pytest.mark.slow
def test_sequences_split_across_two_processes_match_one(one_process, tmp_path):
    """mesh.context = 8 over two processes of 4 devices: each process holds every row and half
    of its positions (cut out of the rows its pipeline reads), and trains as one process."""
    mesh = {"mesh.data": 1, "mesh.fsdp": 1, "mesh.context": 8, "mesh.tensor": 1}
    flags = [f"--config.{k}={v}" for k, v in {**OVERRIDES, **mesh}.items()]
    flags.append("--config.train.progress_bar=false")
    workdir = str(tmp_path / "context")
    procs = start_cluster(workdir, flags)
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert "'context': 8" in outputs[0]
    np.testing.assert_allclose([r["loss"] for r in read_metrics(workdir)], one_process, rtol=1e-5)


def test_slurm_variables_start_the_cluster_the_flags_would(tmp_path, monkeypatch):
    """The SLURM environment of the two processes on 127.0.0.1 that `start_cluster` starts
    (`srun -N 2 --ntasks-per-node=1`) makes llamax-train call `jax.distributed.initialize` with
    what `--coordinator=127.0.0.1:PORT --num_processes=2 --process_id=I` give it. In this
    process, with `initialize` replaced by a stop: nothing trains."""
    import subprocess
    import warnings

    import jax
    from absl import flags

    from llamax.cli import train as train_cli

    started = []

    def popen(command, env, **_):  # each process's flags and what start_cluster adds to its env
        added = {k: v for k, v in env.items() if os.environ.get(k) != v}
        started.append(([a for a in command if a.startswith("--")], added))

    monkeypatch.setattr(subprocess, "Popen", popen)
    start_cluster(str(tmp_path / "slurm"), FLAGS, launcher="slurm")
    assert len(started) == 2

    class Initialized(Exception):
        pass

    calls = []

    def initialize(**kwargs):
        calls.append(kwargs)
        raise Initialized  # before anything trains

    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    monkeypatch.setattr(train_cli, "setup_logging", lambda fmt: None)  # pytest's logging stays

    def llamax_train(argv, env):  # the arguments llamax-train gives jax.distributed.initialize
        # Not the config's overrides (--config.KEY=VALUE), which absl defines as it imports
        # llamax.cli.train, from the process's own command line: none of them is the place.
        argv = [a for a in argv if not a.startswith("--config.")]
        with monkeypatch.context() as m, warnings.catch_warnings():
            # ml_collections' own loader of the config file uses load_module()
            warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
            for name, value in env.items():
                m.setenv(name, value)
            flags.FLAGS(["llamax-train", *argv])
            try:
                with pytest.raises(Initialized):
                    train_cli.main(["llamax-train"])
            finally:
                flags.FLAGS.unparse_flags()
        return calls.pop()

    port = started[0][1]["MASTER_PORT"]
    for i, (argv, env) in enumerate(started):
        assert env["SLURM_PROCID"] == str(i) and not any("--coordinator" in a for a in argv)
        told = llamax_train(argv, env)
        place = [f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
        assert told == llamax_train([*argv, *place], {})
        assert told["cluster_detection_method"] == "deactivate"  # JAX's own detection off
        assert {k: told[k] for k in ("coordinator_address", "num_processes", "process_id")} == {
            "coordinator_address": f"127.0.0.1:{port}",
            "num_processes": 2,
            "process_id": i,
        }
    assert not calls


def test_torchrun_variables():
    """`torchrun --nnodes=2 --nproc-per-node=8`: process 11 is local rank 3 of the second host."""
    env = {"MASTER_ADDR": "node-a", "MASTER_PORT": "29500", "WORLD_SIZE": "16", "RANK": "11",
           "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8"}  # fmt: skip
    kwargs, description = cluster.launcher(env)
    assert kwargs == {"coordinator_address": "node-a:29500", "num_processes": 16,
                      "process_id": 11, "local_device_ids": [3]}  # fmt: skip
    assert description.startswith("WORLD_SIZE/RANK: process 11 of 16")
    # One process per host drives all of its GPUs.
    one_per_host = {**env, "RANK": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                    "WORLD_SIZE": "2"}  # fmt: skip
    assert "local_device_ids" not in cluster.launcher(one_per_host)[0]
    assert cluster.launcher({**env, "WORLD_SIZE": "1", "RANK": "0"}) is None
    with pytest.raises(ValueError, match=r"\['MASTER_PORT'\] are not"):
        cluster.launcher({k: v for k, v in env.items() if k != "MASTER_PORT"})
    with pytest.raises(ValueError, match="RANK must be an integer, got 'x'"):
        cluster.launcher({**env, "RANK": "x"})
    with pytest.raises(ValueError, match="process 16 is not one of 16"):
        cluster.launcher({**env, "RANK": "16"})


def test_slurm_variables():
    """`srun -N 2 --ntasks-per-node=8` and `srun -N 4 --ntasks-per-node=1`."""
    env = {"SLURM_JOB_ID": "123456", "SLURM_NTASKS": "16", "SLURM_PROCID": "9",
           "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "gpu-[007-008]",
           "SLURM_STEP_TASKS_PER_NODE": "8(x2)"}  # fmt: skip
    kwargs, _ = cluster.launcher(env)
    assert kwargs == {"coordinator_address": "gpu-007:23456", "num_processes": 16,
                      "process_id": 9, "local_device_ids": [1]}  # fmt: skip
    per_host = {**env, "SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0",
                "SLURM_STEP_TASKS_PER_NODE": "1(x4)", "MASTER_PORT": "1234"}  # fmt: skip
    kwargs, _ = cluster.launcher(per_host)
    assert kwargs == {"coordinator_address": "gpu-007:1234", "num_processes": 4, "process_id": 2}
    assert cluster.launcher({**env, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    assert cluster.launcher({}) is None


@pytest.mark.parametrize(
    "nodelist, first",
    [("node001", "node001"), ("node001,host2", "node001"), ("gpu-[007-009,012],login1", "gpu-007"),
     ("a[3,5]", "a3"), ("rack[2-3]-n", "rack2-n"), ("10.0.0.5", "10.0.0.5")],
)  # fmt: skip
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert cluster.first_host(nodelist) == first


def test_threads_for_simulated_devices():
    """Four of XLA's CPU threads per simulated device (the pool every device's collectives
    wait in), never fewer than the cores, and a value the user set is kept."""
    flags = "--xla_force_host_platform_device_count=8"
    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {flags}"}
    cluster.threads_for_simulated_devices(env)
    assert env["NPROC"] == str(max(32, os.cpu_count()))
    env = {"JAX_NUM_CPU_DEVICES": "4"}
    cluster.threads_for_simulated_devices(env)
    assert env["NPROC"] == str(max(16, os.cpu_count()))
    env = {"XLA_FLAGS": flags, "NPROC": "3"}
    cluster.threads_for_simulated_devices(env)
    assert env["NPROC"] == "3"
    env = {}
    cluster.threads_for_simulated_devices(env)
    assert env == {}  # one device: nothing to wait for
