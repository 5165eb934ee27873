"""The TPU VM and SLURM scripts: shellcheck-clean, and their dry runs print the right gcloud
commands; the SLURM one runs llamax-train under srun."""

import glob
import os
import shlex
import subprocess
import sys

import pytest
from conftest import REPO

SCRIPTS = sorted(glob.glob(os.path.join(REPO, "scripts", "*.sh")))
SHELLCHECK = os.path.join(os.path.dirname(sys.executable), "shellcheck")
VM = ["--tpu", "t", "--zone", "z"]
TRAIN_ARGS = ["--tpu", "tpu-1", "--zone", "us-east5-a", "--workdir", "gs://b/runs/7b 16k",
              "--tfds-data-dir", "gs://b/tfds", "--tokenizer", "/ckpt/tokenizer.model"]  # fmt: skip


def test_expected_scripts_exist():
    names = {os.path.basename(p) for p in SCRIPTS}
    assert {"tpu_vm.sh", "train.sh", "pretrain_7b.sh", "continue_training.sh",
            "extend_context.sh"} <= names  # fmt: skip


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_shellcheck(script):
    result = subprocess.run([SHELLCHECK, script], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def _run(script, *args, action=None):
    path = os.path.join(REPO, "scripts", script)
    first = [action] if action else []
    return subprocess.run(
        ["bash", path, *first, "--dry-run", *args], capture_output=True, text=True
    )


def _commands(result):
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def _remote(argv):
    return next(a for a in argv if a.startswith("--command="))[len("--command=") :]


def _worker_commands(gcloud_argv):
    """The commands each worker runs in ~/llamax, split into argument lists."""
    argv = shlex.split(_remote(gcloud_argv))
    assert argv[:3] == ["cd", "~/llamax", "&&"]
    if argv[3:5] == ["bash", "-c"]:
        return [shlex.split(part) for part in argv[5].split(" && ")]
    return [argv[3:]]


def test_create_one_slice_and_a_multislice_queued_resource():
    (one,) = _commands(
        _run("tpu_vm.sh", "--tpu", "t", "--zone", "z", "--type", "v5p-128", action="create")
    )
    assert one[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert {"--accelerator-type=v5p-128", "--version=v2-alpha-tpuv5"} <= set(one)
    args = ["--tpu", "t", "--zone", "z", "--type", "v5e-256", "--num-slices", "4", "--spot"]
    (multi,) = _commands(_run("tpu_vm.sh", *args, action="create"))
    assert multi[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert {
        "--node-count=4",
        "--node-prefix=t",
        "--spot",
        "--runtime-version=v2-alpha-tpuv5-lite",
        "--accelerator-type=v5litepod-256",  # gcloud's name of a v5e slice
    } <= set(multi)


@pytest.mark.parametrize(
    "given, gcloud",
    [("v5e-16", "v5litepod-16"), ("v5litepod-16", "v5litepod-16"), ("v4-32", "v4-32"),
     ("v5p-128", "v5p-128"), ("v6e-8", "v6e-8")],
)  # fmt: skip
def test_slice_types_are_gcloud_names(given, gcloud):
    (create,) = _commands(
        _run("tpu_vm.sh", "--tpu", "t", "--zone", "z", "--type", given, action="create")
    )
    assert f"--accelerator-type={gcloud}" in create


def test_setup_and_run_on_all_workers():
    setup_args = [*VM, "--repo", "https://g/l.git", "--ref", "v1"]
    (setup,) = _commands(_run("tpu_vm.sh", *setup_args, action="setup"))
    remote = _remote(setup)
    assert "--worker=all" in setup and "git clone https://g/l.git llamax" in remote
    assert "git -C llamax checkout v1" in remote
    assert ".venv/bin/pip install -q -e '.[tpu]'" in remote
    run_args = [*VM, "--num-slices", "2", "--", "echo", "a b"]
    (run,) = _commands(_run("tpu_vm.sh", *run_args, action="run"))
    assert run[:5] == ["gcloud", "compute", "tpus", "queued-resources", "ssh"]
    assert {"--worker=all", "--node=all"} <= set(run)
    assert _remote(run) == "cd ~/llamax && echo a\\ b"


def test_train_scripts_run_llamax_train_everywhere():
    (pretrain,) = _commands(
        _run("pretrain_7b.sh", *TRAIN_ARGS, "--project", "p", "--", "--config.train.steps=5")
    )
    assert pretrain[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "tpu-1"]
    assert {"--zone=us-east5-a", "--worker=all", "--project=p"} <= set(pretrain)
    # A gs:// tfds data dir is mounted with gcsfuse first (ArrayRecord reads local files only).
    mount, train = _worker_commands(pretrain)
    assert mount == ["scripts/mount_bucket.sh", "b", "gcs/b"]
    assert train == [
        ".venv/bin/llamax-train", "--config", "configs/llama2_7b.py",
        "--workdir", "gs://b/runs/7b 16k",
        "--config.data.tfds_data_dir=gcs/b/tfds", "--config.data.tokenizer=/ckpt/tokenizer.model",
        "--config.train.steps=5",
    ]  # fmt: skip
    for script, config in (("extend_context.sh", "configs/llama2_7b_extend_16k.py"),
                           ("continue_training.sh", "configs/llama2_7b.py")):  # fmt: skip
        (cmd,) = _commands(_run(script, *TRAIN_ARGS, "--init-from", "/ckpt"))
        train = _worker_commands(cmd)[-1]
        assert train[2] == config and "--config.init_from=/ckpt" in train
    local = [a if a != "gs://b/tfds" else "/data/tfds" for a in TRAIN_ARGS]
    (cmd,) = _commands(_run("pretrain_7b.sh", *local))
    (train,) = _worker_commands(cmd)
    assert "--config.data.tfds_data_dir=/data/tfds" in train
    (cmd,) = _commands(
        _run(
            "extend_context.sh",
            *TRAIN_ARGS,
            "--init-from",
            "/ckpt",
            "--config",
            "configs/llama2_7b_extend_32k.py",
        )
    )
    assert "configs/llama2_7b_extend_32k.py" in _remote(cmd)


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("extend_context.sh", TRAIN_ARGS, "missing --init-from"),
        ("continue_training.sh", TRAIN_ARGS, "missing --init-from"),
        ("train.sh", ["--tpu", "t"], "missing --zone --config --workdir"),
        (
            "train.sh",
            [*TRAIN_ARGS, "--config", "configs/nope.py"],
            "no config file configs/nope.py",
        ),
        ("tpu_vm.sh", ["--tpu", "t", "--zone", "z", "--type", "v9-8"], "unknown slice type v9-8"),
        ("tpu_vm.sh", ["--tpu", "t", "--zone", "z"], "create needs --type"),
        ("tpu_vm.sh", ["--tpu", "t"], "--tpu and --zone are required"),
        ("mount_bucket.sh", ["gs://b"], "usage: mount_bucket.sh BUCKET DIR"),
    ],
)
def test_scripts_refuse_bad_arguments(script, args, message):
    result = _run(script, *args, action="create" if script == "tpu_vm.sh" else None)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_slurm_script_runs_one_llamax_train_per_task(tmp_path):
    fake = tmp_path / "srun"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" srun "$@"\n')  # one argument per line
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    script = os.path.join(REPO, "scripts", "slurm_train.sh")
    args = ["configs/llama2_7b.py", "/shared/runs/a b", "--config.train.steps=5"]
    run = subprocess.run(["bash", script, *args], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["srun", "--kill-on-bad-exit=1", "llamax-train", "--config",
                                       "configs/llama2_7b.py", "--workdir", "/shared/runs/a b",
                                       "--config.train.steps=5"]  # fmt: skip
    bad = subprocess.run(["bash", script, "configs/llama2_7b.py"], env=env, capture_output=True,
                         text=True)  # fmt: skip
    assert bad.returncode == 2 and "usage: sbatch" in bad.stderr
