"""docs/finetuning.md's walkthrough, the whole road on a laptop, runs as written: its block as
one bash script (`set -e`), from a directory that looks like the repository's root (its
`configs/` and `bench/`), leaving behind what each stage is meant to."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow  # a dozen commands, six of them training runs


def _block() -> str:
    with open(os.path.join(REPO, "docs", "finetuning.md")) as f:
        text = f.read()
    (block,) = re.findall(r"<!-- walkthrough -->\n```bash\n(.*?)```", text, flags=re.S)
    return block


def test_the_walkthrough_runs_as_written(tmp_path):
    for name in ("configs", "bench"):
        os.symlink(os.path.join(REPO, name), tmp_path / name)
    bin_dir = os.path.dirname(sys.executable)  # the venv's python and llamax-* commands
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("JAX_PLATFORMS", None)  # the block sets it
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", _block()], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    road = tmp_path / "road"
    for run in ("sft", "lora", "rm", "round1", "dpo"):
        records = [json.loads(line) for line in open(road / run / "metrics.jsonl")]
        assert records and all(r["loss"] == r["loss"] for r in records), run  # finite
    sft = [json.loads(line)["loss"] for line in open(road / "sft" / "metrics.jsonl")]
    assert sft[-1] < 0.5 * sft[0], sft  # SFT learns the format and the codes
    adapters = json.loads((road / "lora-peft" / "adapter_config.json").read_text())
    assert adapters["base_model_name_or_path"] == str(road / "sft-hf")
    accuracy = json.loads((road / "rm-eval" / "accuracy.json").read_text())
    assert accuracy["pairs"] == 400 and accuracy["accuracy"] > 0.5, accuracy
    kept = [json.loads(line) for line in open(road / "round1.jsonl")]
    assert kept and all(r["messages"][-1]["role"] == "assistant" for r in kept)
    assert len({r["prompt_index"] for r in kept}) == len(kept)  # the best answer per prompt
    assert "round: 16 prompts x 4 samples" in done.stdout, done.stdout
    assert f"{len(kept)} kept, {16 - len(kept)} skipped" in done.stdout, done.stdout
