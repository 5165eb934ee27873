"""Nothing lost, nothing poisoned (training): a workdir that is someone else's, a full disk
during an async save, a corrupt checkpoint, a lost process of a cluster. (A NaN update is
tests/test_train.py::test_a_nan_update_is_never_saved; hostile files for the converter,
tests/test_hostile_inputs.py.)"""

import json
import os
import shutil
import signal
import time

import jax
import numpy as np
import pytest
from conftest import REFERENCE, REPO, config_flags, hf_model, load_config, run_cli, start_cluster

import llamax
from llamax import checkpoint, convert, train
from llamax.metrics import read_metrics

RUN = {"train.log_every": 1, "train.eval_every": 0, "checkpoint.every": 2}


def _cli(workdir, overrides, limit_file_kib=None):
    """llamax-train in a subprocess; `limit_file_kib` makes every write past that size of a
    file fail (`ulimit -f`: Python ignores SIGXFSZ, so the write returns EFBIG), as a full
    disk does for the checkpoint's files."""
    limit = ["bash", "-c", f'ulimit -f {limit_file_kib} && exec "$@"', "--"]
    argv = [f"--config={REPO}/configs/tiny.py", f"--workdir={workdir}", *config_flags(overrides)]
    return run_cli("train", *argv, prefix=limit if limit_file_kib else ())


def _tree(directory):
    """Every file under a directory with its bytes: to show nothing changed."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            out[os.path.relpath(path, directory)] = open(path, "rb").read()
    return out


# ----- 1. a workdir that is a checkpoint or a model directory -----


@pytest.fixture(scope="module")
def foreign_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("foreign")
    model = hf_model(llamax.LlamaConfig.preset("tiny"))
    model.save_pretrained(root / "hf")
    convert.convert("hf", "llamax", str(root / "hf"), str(root / "ck"))
    return root


@pytest.mark.parametrize("name, what", [("ck", "a converted llamax checkpoint"),
                                        ("hf", "a Hugging Face model directory")])  # fmt: skip
def test_a_workdir_that_is_a_checkpoint_is_refused_untouched(foreign_dirs, name, what):
    directory = foreign_dirs / name
    before = _tree(directory)
    with pytest.raises(ValueError, match=f"is {what}; nothing was written.*init_from="):
        train.run(load_config("tiny", **RUN, **{"train.steps": 3}), str(directory))
    assert _tree(directory) == before
    if name == "ck":
        assert convert.verify(str(directory)) == []
        llamax.load_pretrained(str(directory))
    else:
        from transformers import LlamaForCausalLM

        LlamaForCausalLM.from_pretrained(directory)


@pytest.mark.slow
def test_the_cli_refuses_it_with_one_error_line(foreign_dirs, tmp_path):
    result = _cli(foreign_dirs / "ck", {"train.steps": 3})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("llamax-train: error: --workdir")
    assert "Traceback" not in result.stderr
    # Another program's files, too; an empty directory and an earlier run's are workdirs.
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a llamax training run"):
        train.run(load_config("tiny", **RUN, **{"train.steps": 2}), str(tmp_path))
    os.remove(tmp_path / "notes.txt")
    train.run(load_config("tiny", **RUN, **{"train.steps": 2}), str(tmp_path))
    longer = {"train.steps": 4, "train.accept_changes": True}  # (a changed schedule)
    train.run(load_config("tiny", **RUN, **longer), str(tmp_path))
    assert read_metrics(str(tmp_path))[-1]["step"] == 4


# ----- 3. a save that fails in the background -----


@pytest.mark.slow
def test_a_failed_async_save_stops_at_that_save(tmp_path, caplog):
    workdir = str(tmp_path)
    train.run(load_config("tiny", **RUN, **{"train.steps": 4}), workdir)
    ok = _tree(os.path.join(workdir, "checkpoints", "4"))

    # The files of a save are larger than 100 KiB: every save from now on fails to write.
    longer = {**RUN, "train.steps": 12, "train.accept_changes": True}
    full = _cli(workdir, longer, limit_file_kib=100)
    assert full.returncode == 1, full.stderr[-3000:]
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith("llamax-train: error: Writing the checkpoint of step 6")
    assert "the checkpoint of step 4 is intact" in last
    assert "Traceback" not in full.stderr
    assert read_metrics(workdir)[-1]["step"] < 8  # stopped at the failed save, not later
    assert _tree(os.path.join(workdir, "checkpoints", "4")) == ok
    assert checkpoint.verify(os.path.join(workdir, "checkpoints", "4")) == []

    with caplog.at_level("INFO", logger="llamax"):  # the rerun, in this process
        train.run(load_config("tiny", **longer), workdir)
    assert "resuming from the checkpoint of step 4" in caplog.text
    assert read_metrics(workdir)[-1]["step"] == 12


# ----- 11. checksums recorded at save, verified at restore -----


def _flip_bytes(path, count=40):
    data = bytearray(open(path, "rb").read())
    for i in np.random.default_rng(0).choice(len(data), count, replace=False):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


@pytest.mark.slow
def test_a_corrupt_checkpoint_is_refused_then_set_aside_when_asked(tmp_path, reference_run):
    """The latest checkpoint (step 12) of a copy of the shared reference run is corrupted:
    refused, then set aside; the run resumes from step 6 and ends as the reference did."""
    config = load_config("tiny", **REFERENCE)
    workdir = str(tmp_path / "run")
    shutil.copytree(reference_run[0], workdir)

    step_dir = os.path.join(workdir, "checkpoints", "12")
    recorded = json.loads(open(os.path.join(step_dir, checkpoint.CHECKSUMS)).read())
    params_files = sorted((f for f in recorded if f.startswith("params/") and "/d/" in f),
                          key=lambda f: os.path.getsize(os.path.join(step_dir, f)))  # fmt: skip
    victim = params_files[-1]
    _flip_bytes(os.path.join(step_dir, victim))  # 40 bytes of the largest parameter file
    before = _tree(workdir)

    with pytest.raises(checkpoint.CheckpointError, match=f"step 12 .* is corrupt: {victim}") as e:
        train.run(config, workdir)
    assert "fallback_on_corrupt=true" in str(e.value) and "(step 6)" in str(e.value)
    assert _tree(workdir) == before  # refused before anything was written

    config.checkpoint.fallback_on_corrupt = True
    state = train.run(config, workdir)  # resumes from step 6 and trains steps 7 to 12 again
    assert os.path.isdir(step_dir + ".corrupt")  # set aside, not deleted
    want = reference_run[2]
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)  # as if nothing happened
    assert checkpoint.verify(step_dir) == []


# ----- 12. a lost process of a cluster -----


@pytest.mark.slow
def test_a_lost_process_ends_the_cluster_promptly(tmp_path):
    overrides = {"train.steps": 500, "train.log_every": 1, "train.eval_every": 0,
                 "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                 "cluster.heartbeat_timeout_seconds": 5}  # fmt: skip
    procs = start_cluster(str(tmp_path), config_flags(overrides))
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.time() < deadline and procs[0].poll() is None, procs[0].communicate()[0]
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    killed = time.time()
    out = procs[0].communicate(timeout=120)[0]
    waited = time.time() - killed
    assert procs[0].returncode == 1, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("llamax-train: error:")]
    assert len(errors) == 1 and "process 1 of 2 stopped responding" in errors[0], out[-3000:]
    assert "Fatal Python error" not in out and "SIGABRT" not in out
    # Within the heartbeat timeout and a few seconds, not JAX's shutdown barrier (~78 s).
    assert waited < 30, waited
