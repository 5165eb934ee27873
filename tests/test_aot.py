"""Ahead-of-time compiles for TPU slices (libtpu from PyPI, no TPU): slice names, the report,
refusals, and the CLI."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, load_config

import llamax
from llamax import aot, attention, experiment, setup, sharding


@pytest.mark.parametrize(
    "name, chips, topology",
    [("v5e-16", 16, "v5e:4x4"), ("v5e-256", 256, "v5e:16x16"), ("v6e-8", 8, "v6e:2x4"),
     ("v4-8", 4, "v4:2x2x1"), ("v5p-128", 64, "v5p:4x4x4"), ("v5p-1024", 512, "v5p:8x8x8")],
)  # fmt: skip
def test_slice_names(name, chips, topology):
    tpu = aot.parse_slice(name)
    assert tpu.chips == chips and tpu.topology == topology
    assert len(aot.topology_devices(tpu)) == chips


def test_gcloud_names_of_v5e_slices_are_accepted():
    assert aot.parse_slice("v5litepod-16") == aot.parse_slice("v5e-16")
    assert aot.parse_slice("v5e-16").accelerator_type == "v5litepod-16"
    assert aot.parse_slice("v5p-128").accelerator_type == "v5p-128"


@pytest.mark.parametrize("name", ["v5e-3", "v7-8", "v5p-7", "v4", "tpu-16"])
def test_unknown_slices_are_refused(name):
    with pytest.raises(ValueError, match="TPU slice|No v"):
        aot.parse_slice(name)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["xla", "splash"])
def test_tiny_train_step_compiles_for_v5e(attention):
    c = load_config("tiny")  # with TPU-sized widths, so that tile padding is negligible
    c.model.dim, c.model.n_heads, c.model.n_kv_heads, c.model.vocab_size = 512, 4, 2, 1024
    c.model.multiple_of = 128
    c.train.seq_len, c.model.attention = 128, attention
    r = aot.check(c, "v5e-4")
    model = experiment.model_config(c)
    state_bytes = 3 * 4 * model.num_params()  # float32 parameters and two AdamW moments
    # fsdp over 4 chips: each holds a quarter, and the batch.
    assert state_bytes / 4 <= r["argument_bytes_per_chip"] <= state_bytes / 4 * 1.05 + 2**16
    assert 0 < r["peak_bytes_per_chip"] < r["hbm_bytes_per_chip"] == 16 * 2**30 and r["fits"]
    assert r["mesh"] == {"data": 1, "fsdp": 4, "context": 1, "tensor": 1} and r["chips"] == 4
    assert r["model_flops_per_step"] > 0 and r["compile_seconds"] > 0
    # splash is compiled to Mosaic kernels (forward, and the two backward ones), xla to none.
    assert (r["mosaic_kernel_calls"] > 0) == (attention == "splash")


def test_tiny_train_step_compiles_for_v5p():
    """v5p programs are compiled and measured, never read back as text: JAX's XLA cannot
    parse the async-update instructions libtpu 0.0.52 puts in some v5p schedules."""
    c = load_config("tiny")
    c.train.seq_len, c.model.attention = 128, "splash"
    r = aot.check(c, "v5p-8")
    assert r["chips"] == 4 and r["hbm_bytes_per_chip"] == 95 * 2**30 and r["fits"]
    assert r["mosaic_kernel_calls"] > 0


def test_a_mesh_that_does_not_fit_is_refused():
    c = load_config("tiny")
    c.mesh.fsdp, c.mesh.tensor = -1, 3
    with pytest.raises(ValueError, match="does not fit 1 x v5e-4"):
        aot.check(c, "v5e-4")


@pytest.mark.slow
def test_cli_writes_json(tmp_path):
    out = tmp_path / "fit.json"
    cmd = [sys.executable, "-m", "llamax.cli.aot", "--config", "configs/tiny.py",
           "--topology", "v5e-4", "--json", str(out), "--config.train.batch_size=16"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {"peak_bytes_per_chip", "hbm_bytes_per_chip", "fits", "compile_seconds"} <= set(report)
    assert report["per_device_batch"] == 4 and "fits" in result.stdout
    assert "TPU_WORKER_HOSTNAMES" not in result.stderr  # libtpu knows it is not on a TPU VM
    bad = subprocess.run([*cmd[:6], "v5e-5"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "No v5e slice of 5" in bad.stderr
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_a_step_that_cannot_fit_is_reported():
    """XLA refuses to compile when the temporaries alone exceed the HBM: reported, not raised."""
    c = load_config("tiny")
    c.train.seq_len, c.train.batch_size = 8192, 64
    c.model.attention = "xla"  # its scores: ~17 GB per layer
    r = aot.check(c, "v5e-4")
    assert not r["compiled"] and not r["fits"]
    assert r["temp_bytes_per_chip"] > r["hbm_bytes_per_chip"]
    assert "DOES NOT FIT" in aot.format_report(r)


@pytest.mark.slow
def test_no_bfloat16_copy_of_every_layer_is_held(monkeypatch):
    """libtpu's bfloat16 propagation, left on, turns each layer's cast of its float32 weights
    into a bfloat16 copy of all the layers' weights (here w1, [layers, dim / 16 chips, ffn])
    held for the whole step; the train step compiles with it off
    (`llamax.execution.TPU_COMPILER_OPTIONS`) and makes no such copy."""
    c = load_config("tiny")
    c.model.dim, c.model.n_heads, c.model.n_kv_heads, c.model.ffn_dim = 1024, 8, 8, 2816
    c.model.n_layers, c.model.vocab_size, c.train.seq_len = 4, 1024, 1024
    c.model.dtype, c.model.remat_policy, c.model.attention = "bfloat16", "full", "splash"
    c.train.batch_size = 16
    mesh = setup.make_mesh(c, aot.topology_devices(aot.parse_slice("v5e-16")))

    def copies():
        s = setup.build(c, mesh)
        with sharding.use_mesh(mesh), attention.compiling_for("tpu"):
            lowered = s.train_step.lower(s.abstract_state(), s.abstract_batch())
            text = lowered.compile().as_text()
        return re.findall(r"= bf16\[4,64,2816\]\S* convert\(", text)

    assert not copies()
    monkeypatch.setattr(llamax.execution, "TPU_COMPILER_OPTIONS", {})
    assert copies()


@pytest.mark.parametrize("rank", [0, 4])
def test_a_ppo_iteration_is_measured_in_each_of_its_phases(rank, tiny_lm, tiny_rm, tokenizer_path):
    """PPO on a slice: both update steps compiled, the other model's state beside each; the
    rollouts' engine copy and decode state. The parts against hand computations: AdamW's
    state, the frozen models beside the policy, the KV cache of the decode slots."""
    c = load_config("tiny", **{
        "task": "ppo", "data.source": "prompts", "model.vocab_size": 600, "train.seq_len": 128,
        "train.batch_size": 4, "ppo.rollouts": 16, "ppo.rollout_slots": 8,
        "ppo.max_new_tokens": 16, "init_from": tiny_lm, "ppo.helpful_rm": tiny_rm,
        "ppo.safety_rm": tiny_rm, "data.files": tiny_lm, "data.tokenizer": tokenizer_path,
        "lora.rank": rank,
    })  # fmt: skip
    r = aot.check_ppo(c, "v5e-4")
    assert r["chips"] == 4 and r["compiled"] and r["fits"] and r["rollout_slots"] == 8
    lm = experiment.model_config(c)
    n, n_rm = lm.num_params(), lm.replace(head="score").num_params()
    # A LoRA base in lora.base_dtype; the models beside in their float32 parameters.
    base = 2 if c.lora.base_dtype == "bfloat16" else 4
    if rank == 0:  # float32 parameters and two moments; the reference and 2 reward models
        policy, value, engine = 3 * 4 * n + 4 * (n + 2 * n_rm), 3 * 4 * n_rm, 4 * n
    else:  # the base, the adapters and their moments; no reference (the adapters off)
        policy, value, engine = base * n + 4 * 2 * n_rm, base * n_rm, base * n
    for key, want in (("policy_state", policy), ("value_state", value), ("engine_copy", engine)):
        got = r[f"{key}_bytes_per_chip"]
        assert want / 4 <= got <= want / 4 * 1.1 + 2**16, (key, got, want / 4)
    # The KV cache: 8 slots of 128 positions, keys and values of each layer, float32 by
    # default, the slots split over the 4 chips (beside them: each layer's segment ids, and
    # each slot's position and sampling settings).
    kv = 2 * lm.n_layers * 8 * 128 * lm.kv_heads * lm.head_dim * 4
    assert kv / 4 <= r["decode_state_bytes_per_chip"] <= kv / 4 * 1.1
    phases = r["phase_bytes_per_chip"]
    steps = r["steps"]
    assert (
        phases["policy update"]
        == steps["policy"]["peak_bytes_per_chip"] + r["value_state_bytes_per_chip"]
    )
    assert steps["policy"]["argument_bytes_per_chip"] >= r["policy_state_bytes_per_chip"]
    assert r["peak_bytes_per_chip"] == max(phases.values())
    assert "PPO: 16 rollouts of 128 tokens, 8 decode slots" in aot.format_ppo_report(r)
