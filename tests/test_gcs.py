"""gs:// end to end against a GCS API served on 127.0.0.1 (tests/gcs_server.py): corpus
and tokenizer read from a bucket, a run whose workdir is a bucket killed with SIGKILL and
resumed exactly, conversions from and to buckets, loading, evaluating. `STORAGE_EMULATOR_HOST`
is the only variable llamax is given; credential discovery is switched off and every Python
process here refuses (and records) any connection or name lookup that is not local. The C++
client (tensorstore) cannot be watched that way: its token is fixed and its endpoint is the
emulator's, so it has no address to look for."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO, config_flags, load_config, make_text_corpus, run_cli, saved_params

from llamax import checkpoint, convert, fs, loading, pretrained, train
from llamax.cli import convert as convert_cli
from llamax.cli import eval as eval_cli
from llamax.cli import generate as generate_cli
from llamax.cli import tokenizer as tokenizer_cli
from llamax.data.tokenizer import train_tokenizer
from llamax.metrics import read_metrics

# Subprocesses that train, convert and evaluate; on one worker (pyproject.toml's loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("gcs")]

BUCKET = "gs://llamax-test"
RUN = {"data.source": "tfds", "data.files": f"{BUCKET}/corpus/*", "train.steps": 8,
       "data.tokenizer": f"{BUCKET}/tok/test.model", "model.vocab_size": 512,
       "train.log_every": 1, "train.eval_every": 4, "train.seq_len": 128,
       "checkpoint.every": 2}  # fmt: skip

# Installed in every Python process of these tests (as sitecustomize) and in this one.
GUARD = """
import os, sys

_LOCAL = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


def _llamax_test_guard(event, args):
    if event == "socket.getaddrinfo":
        host = args[0]
    elif event == "socket.connect" and isinstance(args[1], tuple):
        host = args[1][0]
    else:
        return
    host = host.decode() if isinstance(host, bytes) else host
    if host is None or host in _LOCAL or not os.environ.get("LLAMAX_TEST_REQUESTS"):
        return
    with open(os.environ["LLAMAX_TEST_REQUESTS"], "a") as f:
        f.write(f"pid {os.getpid()}: {event} {host}\\n")
    raise OSError(f"test guard: no request may leave this machine (to {host})")


sys.addaudithook(_llamax_test_guard)
"""


def start_emulator(cwd) -> tuple[subprocess.Popen, int]:
    """tests/gcs_server.py serving the bucket `llamax-test`, and its port."""
    server = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tests", "gcs_server.py"), BUCKET[len("gs://"):]],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=cwd, text=True,
    )  # fmt: skip
    line = server.stdout.readline()  # the port, once it serves (empty if it died)
    if not line.strip().isdigit():
        server.kill()
        raise AssertionError(f"emulator did not start (exit code {server.wait()})")
    return server, int(line)


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """An emulator on 127.0.0.1 with an empty bucket; yields the environment of a process that
    uses it (this process's too, restored after)."""
    home = tmp_path_factory.mktemp("gcs")
    server, port = start_emulator(home)
    guard_dir = home / "guard"
    guard_dir.mkdir()
    (guard_dir / "sitecustomize.py").write_text(GUARD)
    requests = home / "requests.log"
    env = {
        "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
        # Credential discovery off, and metadata servers nowhere but a closed local port.
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": "127.0.0.1:1",
        "GCE_METADATA_IP": "127.0.0.1:1",
        "GCE_METADATA_ROOT": "127.0.0.1:1",
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "llamax-test",
        # A request to the emulator (one at a time) that moves no byte for a minute is given up
        # and retried by tensorstore, not waited on for good.
        "TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES": "1",
        "TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS": "60",
        "GOOGLE_APPLICATION_CREDENTIALS": str(home / "no-credentials.json"),
        "CLOUDSDK_CONFIG": str(home / "gcloud"),
        "LLAMAX_TEST_REQUESTS": str(requests),
        "PYTHONPATH": os.pathsep.join([str(guard_dir), os.environ.get("PYTHONPATH", "")]),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: v for k, v in env.items() if k != "PYTHONPATH"})
    fs.honour_storage_emulator()
    exec(compile(GUARD, "guard", "exec"), {})  # this process too (active while the variable is set)
    try:
        yield {**os.environ, **env}
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        fs.honour_storage_emulator()  # what it set for this emulator undone
        server.terminate()
        server.wait(timeout=30)
        assert not requests.exists(), requests.read_text()


def test_tensorstore_follows_the_emulator_host_within_a_process(tmp_path, monkeypatch):
    """A second emulator in the same process (another test's) gets tensorstore's writes, and
    so does a process started from this one; the variables set for an emulator go with it, and
    a user's own value is never replaced."""
    import tensorstore as ts

    monkeypatch.setenv("NO_GCE_CHECK", "true")
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:1")
    monkeypatch.delenv("TENSORSTORE_GCS_HTTP_URL", raising=False)
    monkeypatch.delenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", raising=False)
    script = ("import llamax, os, tensorstore as ts; kv = ts.KvStore.open({'driver': 'gcs', "
              "'bucket': 'llamax-test'}).result(); kv.write('child', b'1').result(timeout=60); "
              "print(os.environ['TENSORSTORE_GCS_HTTP_URL'])")  # fmt: skip
    try:
        for i in range(2):
            server, port = start_emulator(tmp_path)
            try:
                monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"127.0.0.1:{port}")
                fs.honour_storage_emulator()
                assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == f"http://127.0.0.1:{port}"
                kv = ts.KvStore.open({"driver": "gcs", "bucket": "llamax-test"}).result()
                kv.write(f"parent-{i}", b"1").result(timeout=60)
                child = subprocess.run([sys.executable, "-c", script], capture_output=True,
                                       text=True, timeout=120, env=dict(os.environ))  # fmt: skip
                assert child.returncode == 0, child.stderr[-2000:]
                assert child.stdout.strip() == f"http://127.0.0.1:{port}"
                assert kv.list().result(timeout=60) == [b"child", f"parent-{i}".encode()]
            finally:
                server.terminate()
                server.wait(timeout=30)
        monkeypatch.delenv("STORAGE_EMULATOR_HOST")
        fs.honour_storage_emulator()
        assert "TENSORSTORE_GCS_HTTP_URL" not in os.environ
        assert "GOOGLE_AUTH_TOKEN_FOR_TESTING" not in os.environ
        assert os.environ["NO_GCE_CHECK"] == "true"  # set before: not this module's to undo
        monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", "https://gcs.example")
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:9")
        fs.honour_storage_emulator()
        assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == "https://gcs.example"
    finally:
        monkeypatch.undo()
        fs.honour_storage_emulator()


def _train(env, workdir, cwd, overrides):
    return run_cli("train", f"--config={REPO}/configs/tiny.py", f"--workdir={workdir}",
                   *config_flags(overrides), background=True, env=env, cwd=cwd)  # fmt: skip


def _complete_steps(workdir) -> list[int]:
    """The steps saved whole: on object storage orbax marks them with a commit file."""
    directory = f"{workdir}/checkpoints"
    if not fs.isdir(directory):
        return []
    steps = [int(d) for d in fs.listdir(directory) if d.isdigit()]
    return [s for s in steps if fs.exists(f"{directory}/{s}/commit_success.txt")]


@pytest.fixture(scope="module")
def gcs_run(gcs, tmp_path_factory):
    """Corpus and tokenizer uploaded to the bucket; a reference run (local workdir) and a run
    in the bucket killed with SIGKILL after its first checkpoint, then resumed."""
    local = tmp_path_factory.mktemp("gcs-local")
    docs = make_text_corpus(str(local / "corpus"))
    fs.upload(str(local / "corpus"), f"{BUCKET}/corpus")
    lines = [line for doc in docs for line in doc.splitlines() if line]
    train_tokenizer(lines * 4, f"{BUCKET}/tok/test.model", vocab_size=512)
    overrides = {**RUN, "data.tfds_data_dir": str(local / "tfds")}
    reference = str(local / "reference")
    train.run(load_config("tiny", **overrides), reference)

    cwd = tmp_path_factory.mktemp("gcs-cwd")
    workdir = f"{BUCKET}/run"
    proc = _train(gcs, workdir, cwd, overrides)
    deadline = time.time() + 300  # (a hung process fails; 240 s was once too short on 2 cores)
    try:
        while not _complete_steps(workdir):
            assert proc.poll() is None, proc.communicate()[0][-4000:]
            assert time.time() < deadline, "no checkpoint in the bucket after 300 s"
            time.sleep(0.05)
    finally:  # killed after its first checkpoint, or when it failed to write one
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    steps = _complete_steps(workdir)
    resumed = _train(gcs, workdir, cwd, overrides)
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out[-4000:]
    return {"reference": reference, "workdir": workdir, "killed_at": max(steps), "out": out,
            "cwd": cwd, "overrides": overrides, "env": gcs}  # fmt: skip


def test_a_run_in_a_bucket_resumes_exactly_after_sigkill(gcs_run):
    r = gcs_run
    assert r["killed_at"] < RUN["train.steps"], "the run finished before it could be killed"
    assert f"resuming from the checkpoint of step {r['killed_at']}" in r["out"]
    ref = read_metrics(r["reference"])
    got = read_metrics(r["workdir"])
    assert [x["step"] for x in got] == list(range(1, RUN["train.steps"] + 1))
    np.testing.assert_array_equal([x["loss"] for x in got], [x["loss"] for x in ref])
    assert [x.get("eval_loss") for x in got] == [x.get("eval_loss") for x in ref]
    a, b = saved_params(r["workdir"], r["overrides"]), saved_params(r["reference"], r["overrides"])
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    entries = set(fs.listdir(r["workdir"]))
    assert {"config.json", "checkpoints", "metrics.jsonl", "tensorboard", "tokenizer.model"} <= (
        entries
    )
    assert fs.listdir(f"{r['workdir']}/tensorboard"), "no TensorBoard events in the bucket"
    assert not os.path.exists(r["cwd"] / "gs:"), "a local directory named gs: was written"
    last = f"{r['workdir']}/checkpoints/{RUN['train.steps']}"
    # init_from takes a workdir, its checkpoints/ or one step's directory, in a bucket too
    for path in (r["workdir"], f"{r['workdir']}/checkpoints/", last):
        assert pretrained.latest(path) == (f"{r['workdir']}/checkpoints", RUN["train.steps"])
    recorded = fs.read_json(f"{last}/{checkpoint.CHECKSUMS}")
    assert recorded and all(v.startswith("md5:") for v in recorded.values())
    assert checkpoint.verify(last) == []


def test_a_changed_object_in_a_bucket_checkpoint_is_found(gcs_run, tmp_path):
    """The recorded object hashes catch an object replaced after the save, without
    downloading it; on a local copy they are computed from the files."""
    source = f"{gcs_run['workdir']}/checkpoints/{RUN['train.steps']}"
    copy = f"{BUCKET}/tampered/{RUN['train.steps']}"
    local = tmp_path / "step"
    filesystem, inner = fs._fs(source)
    filesystem.get(inner, str(local), recursive=True)
    fs.upload(str(local), copy)
    assert checkpoint.verify(copy) == []
    # Replaced by the same file of an earlier step: intact too, so its CRC32C is the same
    # (OCDBT files end with their own CRC32C); the MD5 differs.
    victim = "params/ocdbt.process_0/manifest.ocdbt"
    earlier = f"{gcs_run['workdir']}/checkpoints/{RUN['train.steps'] - 2}/{victim}"
    assert fs.read_bytes(earlier) != fs.read_bytes(f"{copy}/{victim}")
    filesystem.copy(fs._fs(earlier)[1], fs._fs(f"{copy}/{victim}")[1])
    assert checkpoint.verify(copy) == [f"{victim} differs from its checksum"]
    (local / victim).write_bytes(fs.read_bytes(earlier))  # the local copy, changed alike
    assert checkpoint.verify(str(local)) == [f"{victim} differs from its checksum"]


def test_convert_evaluate_and_load_through_buckets(gcs_run, monkeypatch):
    """The commands in this process (its requests watched as well), to save start-ups; the
    training processes of `gcs_run` are those given only the environment."""
    r, cwd = gcs_run, gcs_run["cwd"]
    monkeypatch.chdir(cwd)  # nothing is written to a local directory named gs:
    hf, back = f"{BUCKET}/hf", f"{BUCKET}/back"
    assert convert_cli.main(["--from", "llamax", "--to", "hf", "--input", r["workdir"],
                             "--output", hf]) == 0  # fmt: skip
    assert {"config.json", "model.safetensors", "manifest.json", "tokenizer.model"} <= set(
        fs.listdir(hf)
    )
    assert not any(".tmp-" in name for name in fs.listdir(BUCKET)), fs.listdir(BUCKET)
    convert.convert("hf", "llamax", hf, back)  # and the Python API
    assert convert.verify(back) == []
    with pytest.raises(FileExistsError, match="exists"):  # as a local output is
        convert.convert("hf", "llamax", hf, back)

    model, params, tokenizer = loading.load_with_tokenizer(back)
    assert tokenizer.vocab_size == 512
    want = saved_params(r["workdir"], r["overrides"])
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(x), y)

    argv = ["perplexity", "--checkpoint", r["workdir"], "--lengths", "64", "--text",
            f"{BUCKET}/corpus/*.txt", "--output", f"{BUCKET}/eval"]  # fmt: skip
    assert eval_cli.main(argv) == 0
    result = json.loads(fs.read_text(f"{BUCKET}/eval/perplexity.json"))
    assert generate_cli.main(["--checkpoint", back, "--prompt", "the model",
                              "--max-new-tokens", "4"]) == 0  # fmt: skip
    # A tokenizer trained from the bucket's corpus into the bucket; no overwrite there either.
    argv = ["train", "--input", f"{BUCKET}/corpus/*.txt", "--vocab-size", "400",
            "--output", f"{BUCKET}/tok/cli.model"]  # fmt: skip
    assert tokenizer_cli.main(argv) == 0
    assert fs.isfile(f"{BUCKET}/tok/cli.model")
    assert tokenizer_cli.main(argv) == 2
    assert result and fs.isfile(f"{BUCKET}/eval/perplexity.png")
    assert not os.path.exists(cwd / "gs:")


def test_files_and_directories_in_a_bucket_are_written_whole(gcs):
    base = f"{BUCKET}/fs"
    fs.write_json(f"{base}/a/one.json", {"x": 1})
    fs.write_text(f"{base}/a/b/two.txt", "two")
    assert fs.glob(f"{base}/**/*.txt") == [f"{base}/a/b/two.txt"]
    assert fs.read_json(f"{base}/a/one.json") == {"x": 1}
    with fs.atomic_path(f"{base}/dir") as tmp:  # a directory: staged locally, then published
        assert not fs.is_remote(tmp)
        os.makedirs(os.path.join(tmp, "sub"))
        for name in ("config.json", "sub/data.bin"):
            with open(os.path.join(tmp, name), "w") as f:
                f.write(name)
    assert fs.files_under(f"{base}/dir") == ["config.json", "sub/data.bin"]
    with pytest.raises(RuntimeError), fs.atomic_path(f"{base}/failed") as tmp:
        os.makedirs(tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write("{}")
        raise RuntimeError("the writer failed")
    assert not fs.exists(f"{base}/failed")
    # A temporary left by a process killed mid-upload goes at the next write of its target.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    stale = f"{base}/dir2.tmp-{fs._HOST}-{dead}-0123abcd"
    fs.write_text(f"{stale}/config.json", "{}")
    fs.write_text(f"{base}/dir2", "whole")
    assert fs.listdir(base) == ["a", "dir", "dir2"]
    assert fs.read_text(f"{base}/dir2") == "whole"


def test_uploaded_bytes_arrive_unchanged(gcs, tmp_path):
    """Every byte of a file uploaded through gcsfs, those its multipart body's line endings
    could be taken for included (the emulator's own parser dropped a last CR)."""
    for i, tail in enumerate((b"\r", b"\n", b"\r\n", b"\n\n", b"")):
        data = bytes(range(256)) + tail
        local = tmp_path / f"f{i}"
        local.write_bytes(data)
        fs.upload(str(local), f"{BUCKET}/bytes/f{i}")
        assert fs.read_bytes(f"{BUCKET}/bytes/f{i}") == data, tail


def test_metrics_reach_the_bucket_while_the_run_goes_on(gcs, monkeypatch):
    from llamax import metrics

    monkeypatch.setattr(metrics, "SYNC_SECONDS", 0)
    writer = metrics.MetricsWriter(f"{BUCKET}/metrics", enabled=True)
    writer.write(1, {"loss": 2.5})
    assert read_metrics(f"{BUCKET}/metrics") == [{"step": 1, "loss": 2.5}]
    writer.write(2, {"loss": 2.25})
    writer.close()
    assert [r["step"] for r in read_metrics(f"{BUCKET}/metrics")] == [1, 2]
    assert fs.listdir(f"{BUCKET}/metrics/tensorboard")
    # Resuming from step 1 drops the records after it, in the bucket too.
    metrics.MetricsWriter(f"{BUCKET}/metrics", start_step=1, enabled=True).close()
    assert [r["step"] for r in read_metrics(f"{BUCKET}/metrics")] == [1]


def test_one_writer_per_workdir_in_a_bucket(gcs, monkeypatch, caplog):
    """The lock of a workdir in a bucket, by object preconditions: a second holder is refused
    naming the first; a lock whose holder is gone (a dead process of this host, or a holder
    elsewhere that stopped renewing) is taken over once, even by two processes at the same
    time; a holder whose lock was taken over learns it at its next renewal."""
    from llamax import lock

    path = f"{BUCKET}/locked/{lock.NAME}"
    first = lock.Lock(path, "--workdir a").acquire()
    with pytest.raises(lock.Held, match=f"in use by process {os.getpid()} on host"):
        lock.Lock(path, "--workdir a").acquire()
    first.release()
    assert not fs.exists(path)

    # A holder on another host that stopped renewing five minutes ago.
    stale = {"host": "elsewhere", "pid": 7, "taken": 0, "renewed": time.time() - 400}
    generation = lock._write_object(path, stale, "0")
    with caplog.at_level("WARNING", logger="llamax"):
        taker = lock.Lock(path, "--workdir a").acquire()
    assert "taking over the lock left by process 7 on host elsewhere" in caplog.text
    # A second taker that saw the same stale generation loses the race.
    with pytest.raises(FileExistsError):
        lock._write_object(path, stale, generation)
    taker.release()

    # A process of this host that is gone; and one elsewhere that renews (not stale).
    dead = {"host": lock.socket.gethostname(), "pid": 2**22 + 1, "renewed": time.time()}
    lock._write_object(path, dead, "0")
    lock.Lock(path, "--workdir a").acquire().release()
    lock._write_object(path, {**stale, "renewed": time.time()}, "0")
    with pytest.raises(lock.Held, match="process 7 on host elsewhere"):
        lock.Lock(path, "--workdir a").acquire()
    fs.remove(path)

    # Renewal under the precondition of the generation written last: taken over meanwhile,
    # the holder finds out and `check` stops it.
    monkeypatch.setattr(lock, "RENEW_SECONDS", 0.2)
    holder = lock.Lock(path, "--workdir a").acquire()
    _, now = lock._read_object(path)
    lock._write_object(path, stale, now)
    time.sleep(1.0)
    with pytest.raises(lock.Held, match="was taken over by process 7 on host elsewhere"):
        holder.check()
    holder.release()
    assert lock._read_object(path)[0]["host"] == "elsewhere"  # not removed by the loser
