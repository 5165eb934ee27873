"""Checkpoints: exact resume after SIGKILL and SIGTERM, kills during async saves, restoring
onto other meshes and device counts, init_from, and shape mismatches."""

import os
import signal
import time

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import (
    REFERENCE,
    REPO,
    config_flags,
    load_config,
    run_cli,
    saved_params,
    start_cluster,
)

from llamax import checkpoint, experiment, pretrained, sharding, train
from llamax.metrics import read_metrics
from llamax.model import Llama, abstract_params

# The shared reference run's config (conftest.py): slow enough that a signal lands mid-run.
RUN = REFERENCE

pytestmark = pytest.mark.slow  # subprocesses that train, get killed and resume


def _start(workdir, overrides):
    return run_cli("train", f"--config={REPO}/configs/tiny.py", f"--workdir={workdir}",
                   *config_flags(overrides), background=True)  # fmt: skip


def _wait_for_step(workdir, step, proc, timeout=120):
    """Until the checkpoint of `step` (or a later one) is complete."""
    directory = os.path.join(workdir, "checkpoints")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.isdir(directory):
            done = [int(d) for d in os.listdir(directory) if d.isdigit()]
            if done and max(done) >= step:
                return max(done)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint of step {step} after {timeout}s")


def _params(workdir):
    """The final parameters a run saved, as numpy arrays."""
    return saved_params(workdir, RUN)


@pytest.fixture
def reference(reference_run):
    """The uninterrupted run of RUN (conftest.py's, shared): workdir, losses, parameters."""
    return reference_run


def _assert_same_run(workdir, reference):
    _, losses, params = reference
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == list(range(1, 13))
    np.testing.assert_array_equal([r["loss"] for r in records], losses)
    for a, b in zip(jax.tree.leaves(_params(workdir)), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)  # bitwise


def _finish(workdir, overrides, caplog):
    """The stopped run started again, in this process (what it resumes from is on disk), to
    its end; its log."""
    caplog.clear()
    with caplog.at_level("INFO", logger="llamax"):
        train.run(load_config("tiny", **overrides), workdir)
    return caplog.text


def test_resume_after_sigkill_is_exact(tmp_path, reference, caplog):
    workdir = str(tmp_path)
    proc = _start(workdir, RUN)
    step = _wait_for_step(workdir, 6, proc)
    proc.kill()
    proc.wait()
    assert step < 12, "the run finished before it could be killed"
    assert f"resuming from the checkpoint of step {step}" in _finish(workdir, RUN, caplog)
    _assert_same_run(workdir, reference)


def test_sigterm_saves_and_exits_cleanly(tmp_path, reference, caplog):
    workdir = str(tmp_path)
    overrides = {**RUN, "checkpoint.every": 100}
    proc = _start(workdir, overrides)
    while not os.path.exists(os.path.join(workdir, "metrics.jsonl")):  # a step or more done
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-3000:]
    saved = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints")).latest_step()
    assert 1 <= saved < 12 and f"saved the checkpoint of step {saved}" in out
    assert f"resuming from the checkpoint of step {saved}" in _finish(workdir, overrides, caplog)
    _assert_same_run(workdir, reference)


def _kill_during_a_save(workdir, proc, timeout=120) -> bool:
    """SIGKILL as soon as a save is in progress (orbax's temporary directory of a step is on
    disk); True when the partial save was still there after the kill."""
    directory = os.path.join(workdir, "checkpoints")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.isdir(directory) and any(not d.isdigit() for d in os.listdir(directory)):
            proc.kill()
            proc.wait()
            return any(not d.isdigit() for d in os.listdir(directory))
        assert proc.poll() is None, proc.communicate()[0][-3000:]
    raise AssertionError(f"no save started within {timeout}s")


def test_kills_during_async_saves_never_break_restart(tmp_path, reference, caplog):
    workdir = str(tmp_path)
    overrides = {**RUN, "checkpoint.every": 1, "checkpoint.keep": 2}
    partial = [_kill_during_a_save(workdir, _start(workdir, overrides)) for _ in range(3)]
    assert any(partial), "no kill landed during a save"
    _finish(workdir, overrides, caplog)
    leftovers = [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if not d.isdigit()]
    assert not leftovers, leftovers  # partial saves were cleaned up
    _assert_same_run(workdir, reference)


def test_restore_onto_other_meshes_and_device_counts(reference):
    workdir, _, params = reference  # written with fsdp=8
    config = experiment.model_config(load_config("tiny", **RUN))
    boxed = abstract_params(Llama(config))
    for mesh in [
        sharding.make_mesh(data=2, fsdp=2, tensor=2),
        sharding.make_mesh(fsdp=4, devices=jax.devices()[:4]),
    ]:
        restored, step = pretrained.restore_params(
            workdir, nn.unbox(boxed), sharding.tree_shardings(boxed, mesh)
        )
        assert step == 12
        wq = restored["layers"]["attention"]["wq"]
        assert wq.sharding.mesh.shape == mesh.shape
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params), strict=True):
            np.testing.assert_array_equal(np.asarray(a), b)


def test_init_from_starts_a_new_run_from_the_parameters(tmp_path, reference):
    source, losses, _ = reference
    config = load_config("tiny", **{**RUN, "train.steps": 2})
    config.init_from = source
    train.run(config, str(tmp_path / "continued"))
    # A fresh run's first loss, that of the initial parameters, is the reference's first.
    continued = read_metrics(str(tmp_path / "continued"))[0]["loss"]
    assert continued < losses[0] - 0.5
    config.init_from = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="init_from: no checkpoint directory"):
        train.run(config, str(tmp_path / "third"))


def test_resuming_with_other_shapes_names_the_parameter(tmp_path, reference):
    import shutil

    workdir = str(tmp_path / "run")
    shutil.copytree(reference[0], workdir)
    config = load_config("tiny", **{**RUN, "model.dim": 128})
    with pytest.raises(ValueError, match=r"configured differently .* model.dim: 64 -> 128"):
        train.run(config, workdir)  # refused as a change of the run...
    config.train.accept_changes = True  # ...and when accepted, the checkpoint cannot fit
    with pytest.raises(
        ValueError,
        match=r"'layers/attention/wk' has shape \(2, 64, 2, 16\) in the checkpoint "
        r"but \(2, 128, 2, 32\)",
    ):
        train.run(config, workdir)


def test_two_processes_resume_exactly(tmp_path, reference):
    overrides = {**RUN, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
    workdir = str(tmp_path)

    def start_both():
        return start_cluster(workdir, config_flags(overrides))

    procs = start_both()
    step = _wait_for_step(workdir, 6, procs[0], timeout=240)
    for p in procs:
        p.kill()
        p.wait()
    assert step < 12
    procs = start_both()
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == list(range(1, 13))
    # One process x 8 devices and two x 4 agree to float rounding, not bitwise.
    np.testing.assert_allclose([r["loss"] for r in records], reference[1], rtol=1e-5)
