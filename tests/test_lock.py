"""One writer per workdir and per conversion output (`llamax.lock`): a second writer is refused
before it writes anything, naming the holder; a lock left by a process killed with SIGKILL is
taken over, and said so. (The same on gs://, by object preconditions: tests/test_gcs.py.)"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO, config_flags, load_config, run_cli

from llamax import lock, train


def _hold_in_child(path):
    """A process that takes the lock at `path`, says so, and sleeps until killed."""
    code = (
        "import sys, time\n"
        "from llamax import lock\n"
        f"lock.Lock({str(path)!r}, 'the test').acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.slow  # a process that holds the lock
def test_a_second_holder_is_refused_with_the_holder_named(tmp_path):
    path = tmp_path / "x.llamax-lock"
    proc = _hold_in_child(path)
    try:
        with pytest.raises(lock.Held) as e:
            lock.Lock(str(path), "--output x").acquire()
        message = str(e.value)
        assert f"process {proc.pid} on host {socket.gethostname()}" in message, message
        assert message.startswith("--output x is in use by"), message
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow  # a process that holds the lock
def test_a_lock_left_by_a_killed_holder_is_taken_over_and_said(tmp_path, caplog):
    path = tmp_path / "x.llamax-lock"
    proc = _hold_in_child(path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(path.read_text())["pid"] == proc.pid  # left behind
    with caplog.at_level("WARNING", logger="llamax"):
        held = lock.Lock(str(path), "--output x").acquire()
    assert f"taking over the lock left by process {proc.pid}" in caplog.text, caplog.text
    assert json.loads(path.read_text())["pid"] == os.getpid()
    held.release()
    assert not path.exists()


def test_a_released_lock_is_taken_again_without_a_word(tmp_path, caplog):
    path = tmp_path / "x.llamax-lock"
    lock.Lock(str(path), "a").acquire().release()
    with caplog.at_level("WARNING", logger="llamax"):
        lock.Lock(str(path), "b").acquire().release()
    assert "taking over" not in caplog.text


def test_a_pid_reused_by_another_process_is_not_the_holder():
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": lock._start_time(1)}
    assert not lock._alive(me)  # this process's id, another process's start time
    assert lock._alive({**me, "started": lock._start_time(os.getpid())})
    assert not lock._alive({**me, "host": "another-host"})


def _chat_config(tmp_path, tokenizer_path, steps=2):
    from conftest import chat_records

    files = tmp_path / "chat.jsonl"
    files.write_text("".join(json.dumps(r) + "\n" for r in chat_records(64)))
    return load_config("tiny", **{
        "task": "sft", "model.vocab_size": 600, "data.source": "chat", "data.files": str(files),
        "data.tokenizer": tokenizer_path, "train.steps": steps, "train.eval_every": 0,
    })  # fmt: skip


def test_a_run_on_a_held_workdir_writes_nothing(tmp_path, tokenizer_path):
    workdir = tmp_path / "run"
    held = lock.workdir(str(workdir))
    with held:
        before = sorted(os.listdir(workdir))
        with pytest.raises(lock.Held, match=f"--workdir {workdir} is in use by process "
                                            f"{os.getpid()}"):  # fmt: skip
            train.run(_chat_config(tmp_path, tokenizer_path), str(workdir))
        assert sorted(os.listdir(workdir)) == before == [lock.NAME]
    assert os.listdir(workdir) == []  # the lock goes with its holder


def test_a_failed_first_run_leaves_no_workdir(tmp_path, tokenizer_path):
    """A run whose data gives no batch stops before writing anything (no config.json, no
    empty checkpoints/ or tensorboard/), and its lock goes with it."""
    c = _chat_config(tmp_path, tokenizer_path)
    (tmp_path / "chat.jsonl").write_text('{"messages": []}\n' * 20)
    with pytest.raises(ValueError, match="usable"):
        train.run(c, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # trains a step
def test_another_tokenizer_than_the_models_is_refused(tmp_path, tiny_lm, tokenizer_path):
    """init_from's tokenizer.model records the ids the model learned: training it on another
    tokenizer's ids is refused before anything is written; its own trains."""
    import shutil

    from llamax.data.tokenizer import train_tokenizer

    other = str(tmp_path / "other.model")
    train_tokenizer([f"line {i} of other text, not the test corpus" for i in range(300)], other,
                    vocab_size=300)  # fmt: skip
    c = _chat_config(tmp_path, other)
    c.init_from = tiny_lm
    with pytest.raises(ValueError, match="is not the tokenizer of init_from"):
        train.run(c, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    # Resuming a workdir with another tokenizer than its earlier run's is refused too.
    c = _chat_config(tmp_path, tokenizer_path, steps=1)
    c.init_from = tiny_lm
    train.run(c, str(tmp_path / "run"))
    shutil.copyfile(other, tmp_path / "other-copy.model")
    c.data.tokenizer, c.train.steps, c.init_from = str(tmp_path / "other-copy.model"), 2, ""
    with pytest.raises(ValueError, match="this workdir's earlier run"):
        train.run(c, str(tmp_path / "run"))


def _run(seed):
    return {"train.steps": 30, "train.log_every": 1, "train.eval_every": 0, "train.seed": seed}


def _train(workdir, seed):
    return run_cli("train", f"--config={REPO}/configs/tiny.py", f"--workdir={workdir}",
                   *config_flags(_run(seed)), background=True)  # fmt: skip


@pytest.mark.slow
def test_two_runs_on_one_workdir_one_refuses(tmp_path):
    """Started together on one workdir, one run trains and the other stops at once with one
    error line naming it: every step is in metrics.jsonl once, with the holder's seed."""
    workdir = tmp_path / "run"
    first = _train(workdir, seed=1)
    deadline = time.time() + 120
    while not (workdir / lock.NAME).exists():
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.05)
    second = _train(workdir, seed=2)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 2, out
    errors = [line for line in out.splitlines() if "error" in line]
    holder = f"in use by process {first.pid} on host {socket.gethostname()}"
    assert len(errors) == 1, out
    assert errors[0].startswith(f"llamax-train: error: --workdir {workdir} is {holder}"), out
    assert first.poll() is None  # refused at once, while the holder still runs
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out
    steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")]
    assert steps == list(range(1, 31))
    assert json.load(open(workdir / "config.json"))["train"]["seed"] == 1
    assert not (workdir / lock.NAME).exists()


@pytest.mark.slow
def test_a_killed_run_is_resumed_and_its_lock_taken_over(tmp_path, caplog):
    workdir = tmp_path / "run"
    first = _train(workdir, seed=1)
    deadline = time.time() + 300
    while not (workdir / "metrics.jsonl").exists():
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.05)
    first.kill()
    first.wait()
    with caplog.at_level("INFO", logger="llamax"):  # the next run, in this process
        train.run(load_config("tiny", **_run(seed=1)), str(workdir))
    assert f"taking over the lock left by process {first.pid}" in caplog.text, caplog.text
    assert [r["step"] for r in map(json.loads, open(workdir / "metrics.jsonl"))] == list(
        range(1, 31)
    )


@pytest.mark.slow
def test_two_conversions_into_one_output_one_refuses(tmp_path, capsys):
    """The second conversion into an output another is writing is refused at once, naming it
    (not `[Errno 39] Directory not empty` when both try to publish); the first completes."""
    import numpy as np

    import llamax
    from llamax import convert
    from llamax.cli import convert as convert_cli
    from llamax.convert import hf

    config = llamax.LlamaConfig.preset("tiny")
    tensors = {name: (lambda shape=shape: np.full(shape, 0.01, np.float32))
               for name, shape in hf.expected_hf_shapes(config).items()}  # fmt: skip
    (tmp_path / "hf").mkdir()
    hf.write(config, tensors, str(tmp_path / "hf"), "float32")
    out = tmp_path / "out"
    first = run_cli("convert", "--from", "hf", "--to", "llamax", "--input", str(tmp_path / "hf"),
                    "--output", str(out), background=True)  # fmt: skip
    held = tmp_path / f"out{lock.SUFFIX}"
    deadline = time.time() + 120
    while not (held.exists() and held.stat().st_size):  # taken, its holder's record written
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.005)
    first.send_signal(signal.SIGSTOP)  # holding its lock, whatever the machine's speed
    try:
        code = convert_cli.main(["--from", "hf", "--to", "llamax", "--input",
                                 str(tmp_path / "hf"), "--output", str(out)])  # fmt: skip
    finally:
        first.send_signal(signal.SIGCONT)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"llamax-convert: error: --output {out} is in use by process "
                             f"{first.pid} on host {socket.gethostname()}"), err  # fmt: skip
    first_out = first.communicate(timeout=120)[0]
    assert first.returncode == 0, first_out
    assert convert.verify(str(out)) == [] and not held.exists()
