"""Test set-up: 8 simulated CPU devices (set before jax is imported) and shared helpers."""

import os

# The suite compiles hundreds of small programs, and LLVM's optimization of their CPU code
# was about half of each compile while buying nothing at these sizes: at level 0 a
# compile-bound test takes half the time (measured on the 2-core machine, test_train's
# accumulation test 29 s -> 15 s). The tests' programs and tolerances are the same; the flag
# is the tests' own (runs, the demo and the benchmarks compile at XLA's default level), and
# the processes the tests start inherit it.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8",
     "--xla_backend_optimization_level=0"]
).strip()  # fmt: skip
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import llamax  # noqa: E402, F401  (threads for the simulated devices: cluster.py)

assert jax.device_count() == 8, "conftest must run before jax initializes its backend"


def hf_model(config, seed=0, weight_std=0.15):
    """A transformers `LlamaForCausalLM` (eager attention, float32) with random weights large
    enough that errors show in the logits, and norm scales away from 1 so their mapping counts."""
    import torch
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    from llamax.convert.hf import hf_config

    hf = HFConfig(**hf_config(config), attn_implementation="eager")
    model = LlamaForCausalLM(hf).eval().float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(weight_std * torch.randn_like(p))
    return model


def hf_logits(model, tokens, attention_mask=None, position_ids=None):
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(np.asarray(tokens), dtype=torch.long),
            attention_mask=None if attention_mask is None else torch.as_tensor(attention_mask),
            position_ids=None if position_ids is None else torch.as_tensor(position_ids),
        )
    return out.logits.float().numpy()


def llamax_params_from(model, config):
    from llamax.convert.hf import params_from_hf

    return jax.tree.map(jax.numpy.asarray, params_from_hf(model.state_dict(), config))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def random_params(config, seed=0, std=0.15):
    """Random llamax parameters with activations of order one (the default init's 0.02 makes
    logits so small that almost any bug would pass a tolerance); norm scales vary around 1."""
    import flax.linen as nn

    from llamax.model import Llama, abstract_params

    # The shapes only: every leaf is drawn here (compiling the model's init took seconds).
    leaves, tree = jax.tree.flatten_with_path(nn.unbox(abstract_params(Llama(config))))
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    out = []
    for (path, leaf), key in zip(leaves, keys, strict=True):
        noise = jax.random.normal(key, leaf.shape, leaf.dtype)
        is_norm = jax.tree_util.keystr(path).endswith("['scale']")
        out.append(1.0 + 0.2 * noise if is_norm else std * noise)
    return jax.tree.unflatten(tree, out)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, **overrides):
    """`configs/<name>.py`'s get_config(), with overrides of top-level ("task": "sft") and
    dotted keys ("train.steps": 3)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.train.progress_bar = False
    for key, value in overrides.items():
        *section, field = key.split(".")
        (config[section[0]] if section else config)[field] = value
    return config


def saved_params(path, overrides, config="tiny"):
    """The parameters of the latest checkpoint under `path` (a run of `configs/<config>.py`
    with `overrides`), as numpy arrays on one device."""
    import flax.linen as nn

    from llamax import experiment, pretrained, sharding
    from llamax.model import Llama, abstract_params

    boxed = abstract_params(Llama(experiment.model_config(load_config(config, **overrides))))
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    params, _ = pretrained.restore_params(
        path, nn.unbox(boxed), sharding.tree_shardings(boxed, mesh)
    )
    return jax.tree.map(np.asarray, params)


WORDS = ("the model trains on packed documents with rotary positions and grouped query "
         "attention while the optimizer keeps float32 master weights for every parameter "
         "naïve café résumé größe über straße 東京 数据 😀").split()  # fmt: skip


def make_text_corpus(directory, num_files=12, seed=0):
    """Small .txt and .jsonl files of pseudo-sentences; returns the list of documents."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    docs = []
    for i in range(num_files):
        texts = [
            f"doc {i}-{j}: " + " ".join(rng.choice(WORDS, rng.integers(5, 60))) + ".\n"
            for j in range(3)
        ]
        if i % 2:
            import json

            with open(os.path.join(directory, f"part{i}.jsonl"), "w") as f:
                f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
            docs.extend(texts)
        else:
            with open(os.path.join(directory, f"part{i}.txt"), "w") as f:
                f.write("".join(texts))
            docs.append("".join(texts))
    return docs


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    docs = make_text_corpus(str(directory))
    return str(directory), docs


@pytest.fixture(scope="session")
def tokenizer_path(text_corpus, tmp_path_factory):
    from llamax.data.tokenizer import train_tokenizer

    lines = [line for doc in text_corpus[1] for line in doc.splitlines() if line]
    path = str(tmp_path_factory.mktemp("tokenizer") / "test.model")
    train_tokenizer(lines * 4, path, vocab_size=600)
    return path


def config_flags(overrides):
    """`--config.KEY=VALUE` flags of llamax-train (and llamax-aot) for `overrides`, the progress
    bar off."""
    return [f"--config.{k}={v}" for k, v in overrides.items()] + [
        "--config.train.progress_bar=false"
    ]


def run_cli(name, *argv, background=False, env=None, cwd=REPO, timeout=300, prefix=(), **kwargs):
    """A llamax command in a process of its own: `python -m llamax.cli.<name> ARGV`, or the
    installed console script when `name` is one (`llamax-train`). To completion: its
    `CompletedProcess` (stdout and stderr as text); with `background`, its `Popen`, stdout and
    stderr together on its stdout. `env` replaces the environment; `prefix` goes before the
    command (`bash -c 'ulimit ...' --`); `kwargs` go to subprocess (`stderr=FILE`, ...)."""
    import subprocess
    import sys

    if name.startswith("llamax-"):
        command = [os.path.join(os.path.dirname(sys.executable), name), *argv]
    else:
        command = [sys.executable, "-m", f"llamax.cli.{name}", *argv]
    command = [*prefix, *command]
    kwargs = {"stdout": subprocess.PIPE, "text": True, "env": env, "cwd": cwd, **kwargs}
    if background:
        return subprocess.Popen(command, **{"stderr": subprocess.STDOUT, **kwargs})
    return subprocess.run(command, timeout=timeout, **{"stderr": subprocess.PIPE, **kwargs})


def start_cluster(workdir, flags, processes=2, devices_each=4, config="tiny", launcher="flags"):
    """`llamax-train` as `processes` processes of `devices_each` CPU devices forming one JAX
    cluster on 127.0.0.1; output (stdout and stderr together) on each process's stdout. The
    processes learn their place from flags, or as torchrun or SLURM (`srun`) would tell them."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_each}"}  # fmt: skip

    def place(i):  # (extra flags, extra environment) of process i
        if launcher == "flags":
            return [f"--coordinator=127.0.0.1:{port}", f"--num_processes={processes}",
                    f"--process_id={i}"], {}  # fmt: skip
        if launcher == "torchrun":  # one host, `torchrun --nproc-per-node=N`
            return [], {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                        "WORLD_SIZE": str(processes), "RANK": str(i), "LOCAL_RANK": str(i),
                        "LOCAL_WORLD_SIZE": str(processes)}  # fmt: skip
        assert launcher == "slurm"  # one task per node of `srun -N N --ntasks-per-node=1`
        return [], {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": str(processes),
                    "SLURM_PROCID": str(i), "SLURM_LOCALID": "0",
                    "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_STEP_TASKS_PER_NODE": "1",
                    "MASTER_PORT": str(port)}  # fmt: skip

    procs = []
    for i in range(processes):
        extra_flags, extra_env = place(i)
        argv = [f"--config={REPO}/configs/{config}.py", f"--workdir={workdir}",
                "--config.train.progress_bar=false", *flags, *extra_flags]  # fmt: skip
        procs.append(run_cli("train", *argv, background=True, env={**env, **extra_env}))
    return procs


# ----- one uninterrupted training run, the reference of the runs that are stopped -----

# Slow enough (about 0.3 s a step) that a signal lands mid-run; a checkpoint every 6 steps.
REFERENCE = {"train.steps": 12, "train.log_every": 1, "train.eval_every": 0,
             "train.seq_len": 256, "checkpoint.every": 6}  # fmt: skip


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """`configs/tiny.py` with `REFERENCE`'s overrides trained without a stop: (its workdir,
    the loss of each step, its final parameters as numpy arrays). Read it, never write into it
    (copy it first). tests/test_checkpoint.py and tests/test_failures.py compare stopped and
    resumed runs with it (tests/test_gcs.py's run reads its corpus from a bucket, and
    tests/test_multiprocess.py's clusters train 4 short steps: each keeps a reference of its
    own)."""
    from llamax import train
    from llamax.metrics import read_metrics

    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    train.run(load_config("tiny", **REFERENCE), workdir)
    losses = [r["loss"] for r in read_metrics(workdir)]
    return workdir, losses, saved_params(workdir, REFERENCE)


# ----- tiny checkpoints shared by the tests (written, not trained) -----


def write_checkpoint(path, config, params, tokenizer_path):
    """A llamax checkpoint of `params` with its tokenizer, as llamax-convert writes one
    (`config.json`, `checkpoints/0/`, `tokenizer.model`, `manifest.json`)."""
    import shutil

    from llamax.convert import hf, manifest, native

    tensors = {k: (lambda v=v: v) for k, v in hf.params_to_hf(params, config).items()}
    os.makedirs(path)
    native.write(config, tensors, path, "float32")
    shutil.copyfile(tokenizer_path, os.path.join(path, "tokenizer.model"))
    manifest.write(path, config, "llamax", "float32")
    return path


def _tiny_lm_config():
    return llamax.LlamaConfig.preset("tiny", vocab_size=600)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory, tokenizer_path):
    """A converted tiny language model (random weights, the test tokenizer): read it, never
    write into it (copy it first)."""
    config = _tiny_lm_config()
    path = str(tmp_path_factory.mktemp("tiny") / "lm")
    return write_checkpoint(path, config, random_params(config, seed=21), tokenizer_path)


@pytest.fixture(scope="session")
def tiny_rm(tmp_path_factory, tokenizer_path):
    """A converted tiny reward model (a score head; random weights, the test tokenizer)."""
    config = _tiny_lm_config().replace(head="score")
    path = str(tmp_path_factory.mktemp("tiny") / "rm")
    return write_checkpoint(path, config, random_params(config, seed=22), tokenizer_path)


def chat_records(n, seed=0):
    """`n` short chat SFT records (question and answer over the test corpus's words)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a, b = int(rng.integers(0, 9)), int(rng.integers(0, 9))
        words = " ".join(rng.choice(WORDS[:20], 3))
        question = {"role": "user", "content": f"{words} {a} plus {b}?"}
        out.append({"messages": [question, {"role": "assistant", "content": f"{a + b} {words}"}]})
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_lm, tokenizer_path):
    """A training run's workdir: 2 steps of chat SFT from `tiny_lm` (config.json, metrics,
    checksummed checkpoints of steps 1 and 2, tokenizer.model). Copy it before changing it."""
    import json

    from llamax import train

    root = tmp_path_factory.mktemp("tiny_run")
    files = root / "chat.jsonl"
    files.write_text("".join(json.dumps(r) + "\n" for r in chat_records(64)))
    c = load_config("tiny", **{
        "task": "sft", "model.vocab_size": 600, "data.source": "chat", "data.files": str(files),
        "data.tokenizer": tokenizer_path, "train.steps": 2, "train.log_every": 1,
        "train.eval_every": 0, "checkpoint.every": 1, "checkpoint.async_save": False,
    })  # fmt: skip
    c.init_from = tiny_lm
    train.run(c, str(root / "run"))
    return str(root / "run")
