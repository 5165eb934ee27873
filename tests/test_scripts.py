"""The TPU VM scripts: shellcheck-clean, and their dry runs print the right commands."""

import glob
import os
import shlex
import subprocess
import sys

import pytest
from conftest import REPO

SCRIPTS = sorted(glob.glob(os.path.join(REPO, "scripts", "*.sh")))
SHELLCHECK = os.path.join(os.path.dirname(sys.executable), "shellcheck")


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_shellcheck(script):
    result = subprocess.run([SHELLCHECK, script], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def _run(*args):
    script = os.path.join(REPO, "scripts", "extend_context.sh")
    return subprocess.run(["bash", script, *args], capture_output=True, text=True, cwd=REPO)


def test_extend_context_dry_run():
    result = _run(
        "--dry-run", "--tpu", "tpu-1", "--zone", "us-east5-a", "--project", "p",
        "--init-from", "/ckpt/llama2-7b", "--workdir", "/runs/7b 16k",
        "--tfds-data-dir", "gs://b/tfds", "--tokenizer", "/ckpt/llama2-7b/tokenizer.model",
        "--config", "configs/llama2_7b_extend_32k.py",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "tpu-1"]
    assert {"--zone=us-east5-a", "--worker=all", "--project=p"} <= set(argv)
    remote = next(a for a in argv if a.startswith("--command="))[len("--command=") :]
    cd, train = remote.split(" && ")
    assert cd == "cd ~/llamax"
    assert shlex.split(train) == [
        ".venv/bin/llamax-train", "--config", "configs/llama2_7b_extend_32k.py",
        "--workdir", "/runs/7b 16k", "--config.init_from=/ckpt/llama2-7b",
        "--config.data.tfds_data_dir=gs://b/tfds",
        "--config.data.tokenizer=/ckpt/llama2-7b/tokenizer.model",
    ]  # fmt: skip


def test_extend_context_refuses_missing_arguments():
    result = _run("--dry-run", "--tpu", "tpu-1")
    assert result.returncode == 2
    assert "missing --zone --init-from --workdir --tfds-data-dir --tokenizer" in result.stderr
    required = ["--tpu", "t", "--zone", "z", "--init-from", "i", "--workdir", "w"]
    required += ["--tfds-data-dir", "d", "--tokenizer", "t"]
    bad = _run("--dry-run", *required, "--config", "configs/nope.py")
    assert bad.returncode == 2 and "no config file configs/nope.py" in bad.stderr
