"""The training loop: sharding-invariant losses, gradient accumulation, learning, outputs."""

import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

import llamax
from llamax import data, losses, setup, train
from llamax.metrics import read_metrics


def _losses(workdir):
    return np.array([r["loss"] for r in read_metrics(workdir)])


def _run(tmp_path, name, devices=None, **overrides):
    config = load_config("tiny", **{"train.log_every": 1, "train.eval_every": 0, **overrides})
    workdir = str(tmp_path / name)
    state = train.run(config, workdir, devices=devices)
    return _losses(workdir), state


@pytest.mark.slow
def test_same_losses_on_any_mesh(tmp_path):
    """float32, 5 steps: 1 device and five 8-device meshes (data x fsdp x context x tensor;
    context splits each sequence) agree within 1e-5 relative."""
    steps = {"train.steps": 5}
    ref, _ = _run(tmp_path, "one", devices=jax.devices()[:1], **steps)
    assert len(ref) == 5 and ref[-1] < ref[0]
    for shape in [(8, 1, 1, 1), (2, 2, 1, 2), (1, 4, 1, 2), (2, 2, 2, 1), (1, 1, 4, 2)]:
        names = ("mesh.data", "mesh.fsdp", "mesh.context", "mesh.tensor")
        mesh = dict(zip(names, shape, strict=True))
        losses, _ = _run(tmp_path, "x".join(map(str, shape)), **steps, **mesh)
        np.testing.assert_allclose(losses, ref, rtol=1e-5, atol=0, err_msg=str(shape))


@pytest.mark.slow
def test_grad_accumulation_equals_big_batch(tmp_path):
    """4 micro-batches of 4 give the losses and parameters of one batch of 16."""
    common = {"train.steps": 3, "train.batch_size": 16, "mesh.fsdp": 4, "mesh.data": 1}
    big, big_state = _run(tmp_path, "big", devices=jax.devices()[:4], **common)
    acc, acc_state = _run(
        tmp_path, "acc", devices=jax.devices()[:4], **common, **{"train.grad_accum_steps": 4}
    )
    np.testing.assert_allclose(acc, big, rtol=1e-5)
    for a, b in zip(
        jax.tree.leaves(acc_state.params), jax.tree.leaves(big_state.params), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_learns_markov_chain_entropy_rate(tmp_path):
    """The held-out loss gets within 5% of the chain's entropy rate (and not below it: a loss
    under the entropy rate would mean the targets leak into the inputs)."""
    overrides = {
        "train.steps": 120, "train.batch_size": 16, "train.seq_len": 128,
        "train.log_every": 40, "train.eval_every": 120, "train.eval_batches": 4,
        "optimizer.learning_rate": 1e-2, "optimizer.warmup_steps": 10,
        "data.markov_states": 16,
    }  # fmt: skip
    config = load_config("tiny", **overrides)
    train.run(config, str(tmp_path))
    entropy = data.MarkovSource(
        16, config.data.markov_alpha, config.data.seed, "train"
    ).entropy_rate
    eval_loss = read_metrics(str(tmp_path))[-1]["eval_loss"]
    print(f"entropy rate {entropy:.4f} nats, held-out loss {eval_loss:.4f}")
    assert 0.97 * entropy <= eval_loss <= 1.05 * entropy


def test_outputs_metrics_config_and_tensorboard(tmp_path):
    config = load_config(
        "tiny",
        **{"train.steps": 6, "train.log_every": 3, "train.eval_every": 6,
           "model.attention": "chunked", "model.remat_policy": "full"},
    )  # fmt: skip
    train.run(config, str(tmp_path))
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == [3, 6]
    for r in records:
        assert {"step", "loss", "learning_rate", "grad_norm", "tokens_per_second", "mfu"} <= set(r)
        assert r["tokens_per_second"] > 0 and r["mfu"] is None  # no known peak for a CPU
    assert "eval_loss" in records[-1]
    resolved = json.loads((tmp_path / "config.json").read_text())
    assert resolved["train"]["steps"] == 6
    assert resolved["model"]["resolved"] == llamax.LlamaConfig.preset("tiny").to_dict()

    # The checkpoint records the architecture only: loading it picks how to run it.
    model, params = llamax.load_pretrained(str(tmp_path))
    assert model.config == llamax.LlamaConfig.preset("tiny")
    assert (model.execution.attention, model.execution.remat_policy) == ("auto", "none")
    model, _ = llamax.load_pretrained(str(tmp_path), dtype="bfloat16", attention="chunked")
    assert (model.execution.dtype, model.execution.attention) == ("bfloat16", "chunked")

    # TensorBoard: TFRecord framing (length, crc, event, crc) of Event protos.
    from tensorboardX.proto import event_pb2

    (events_file,) = (tmp_path / "tensorboard").iterdir()
    raw, tags = events_file.read_bytes(), {}
    while raw:
        (length,) = struct.unpack("<Q", raw[:8])
        event = event_pb2.Event.FromString(raw[12 : 12 + length])
        for value in event.summary.value:
            tags.setdefault(value.tag, []).append((event.step, value.simple_value))
        raw = raw[16 + length :]
    assert [s for s, _ in tags["loss"]] == [3, 6]
    assert tags["loss"][-1][1] == pytest.approx(records[-1]["loss"])
    assert "learning_rate" in tags and "grad_norm" in tags and "eval_loss" in tags


def test_a_nan_update_is_never_saved(tmp_path, caplog):
    """The issue's case: a huge learning rate makes an update NaN while the loss (of the
    parameters before it) is still finite. The run stops before saving that step and names
    the last checkpoint, whose state is finite, and a rerun resumes from exactly that one."""
    wild = {"train.steps": 10, "train.log_every": 1, "optimizer.learning_rate": 1e6,
            "checkpoint.every": 1}  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"Step \d+ is not finite") as error:
        train.run(load_config("tiny", **wild), str(tmp_path))
    message = str(error.value)
    bad_step = int(message.split("Step ")[1].split()[0])
    resume = int(message.split("resumes from the checkpoint of step ")[1].split(",")[0])
    saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert saved and max(saved) == resume < bad_step  # the diverged state is never saved
    _, params = llamax.load_pretrained(str(tmp_path))
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))
    assert all(np.isfinite(r["loss"]) for r in read_metrics(str(tmp_path)))

    caplog.set_level("INFO", logger="llamax")
    with pytest.raises(FloatingPointError):  # the same learning rate diverges again
        train.run(load_config("tiny", **wild), str(tmp_path))
    assert f"resuming from the checkpoint of step {resume} " in caplog.text


def test_bad_batch_layout_is_explained(tmp_path):
    config = load_config("tiny", **{"train.batch_size": 12, "train.grad_accum_steps": 1})
    with pytest.raises(ValueError, match="must split evenly over the mesh's data x fsdp = 8"):
        train.run(config, str(tmp_path))
    config = load_config("tiny", **{"train.batch_size": 8, "train.grad_accum_steps": 3})
    with pytest.raises(ValueError, match="multiple of train.grad_accum_steps"):
        train.run(config, str(tmp_path))


def test_loss_against_numpy_reference(rng):
    """Cross-entropy over valid targets only: no prediction into padding (segment 0) or across
    a document boundary; z-loss adds weight * log(Z)^2 for the same targets."""
    logits = rng.normal(size=(2, 7, 11)).astype(np.float32)
    tokens = rng.integers(0, 11, (2, 7))
    segment_ids = np.array([[1, 1, 1, 2, 2, 2, 0], [0, 0, 1, 1, 1, 1, 1]])
    nll, z, count = losses.next_token_loss(jnp.asarray(logits), tokens, segment_ids, z_loss=1e-2)

    want_nll = want_z = want_count = 0.0
    for b in range(2):
        for t in range(6):
            if segment_ids[b, t] == segment_ids[b, t + 1] != 0:
                row = logits[b, t].astype(np.float64)
                log_z = np.log(np.exp(row).sum())
                want_nll += log_z - row[tokens[b, t + 1]]
                want_z += 1e-2 * log_z**2
                want_count += 1
    assert want_count == 2 + 2 + 4
    assert float(count) == want_count
    np.testing.assert_allclose(float(nll), want_nll, rtol=1e-5)
    np.testing.assert_allclose(float(z), want_z, rtol=1e-5)


def test_data_rows_independent_of_how_they_are_split():
    source = data.MarkovSource(32, 0.3, 0, "train")
    whole = source.rows(3, np.arange(8), 16)["tokens"]
    halves = [source.rows(3, np.arange(4) + 4 * i, 16)["tokens"] for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), whole)
    assert not np.array_equal(source.rows(4, np.arange(8), 16)["tokens"], whole)


@pytest.mark.slow
def test_rerun_from_scratch_replaces_metrics(tmp_path):
    """Without a checkpoint a rerun starts at step 0, and metrics.jsonl holds each step once."""
    config = load_config("tiny", **{"train.steps": 4, "train.log_every": 2, "train.eval_every": 0})
    train.run(config, str(tmp_path))
    train.run(config, str(tmp_path))
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [2, 4]


def test_held_out_batches_come_from_one_iterator_rewound(tmp_path, monkeypatch):
    """Each evaluation reads the same validation batches, from an iterator built once."""
    made = []
    make_iterator = data.make_iterator

    def counting(c, split, *args):
        made.append(split)
        return make_iterator(c, split, *args)

    monkeypatch.setattr(data, "make_iterator", counting)
    config = load_config("tiny", **{"train.steps": 6, "train.log_every": 2, "train.eval_every": 2})
    state = train.run(config, str(tmp_path))
    assert made == ["train", "validation"]

    s = setup.build(config, setup.make_mesh(config))
    held_out = train.HeldOutLoss(s, s.local_rows())
    with llamax.sharding.use_mesh(s.mesh):
        first, second = held_out(state), held_out(state)
    assert first == second == read_metrics(str(tmp_path))[-1]["eval_loss"]


def test_resuming_with_changes_that_alter_the_run_is_refused(tmp_path, caplog):
    """A longer run rescales the cosine schedule mid-run: refused with the changes listed and
    the flag that accepts them; changes of how the run reports or saves are logged."""
    workdir = str(tmp_path)
    train.run(load_config("tiny", **{"train.steps": 4, "checkpoint.every": 2}), workdir)
    changed = {"train.steps": 8, "optimizer.learning_rate": 1e-3, "train.log_every": 2,
               "checkpoint.every": 4}  # fmt: skip
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(ValueError, match="configured differently") as error:
        train.run(load_config("tiny", **changed), workdir)
    message = str(error.value)
    assert "train.steps: 4 -> 8" in message and "optimizer.learning_rate: 0.003 -> 0.001" in message
    assert "log_every" not in message and "--config.train.accept_changes=true" in message
    assert (tmp_path / "config.json").read_text() == before  # nothing written

    caplog.set_level("INFO", logger="llamax")
    accepted = load_config("tiny", **changed, **{"train.accept_changes": True})
    train.run(accepted, workdir)
    assert "resuming with train.log_every: 5 -> 2" in caplog.text
    assert "resuming with train.steps: 4 -> 8 (accepted)" in caplog.text
    assert read_metrics(workdir)[-1]["step"] == 8
