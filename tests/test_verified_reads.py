"""Every read of a checkpoint is verified against the checksums recorded when it was written
(a training step's `checksums.json`, a converted checkpoint's `manifest.json`) before any
tensor is read, or said plainly to be unverifiable; a base or a reference is identified by
its content, not by its path and step (issue 28, items 2 and 3)."""

import json
import logging
import os
import re
import shutil

import pytest
from conftest import chat_records, load_config, random_params, write_checkpoint
from test_gcs import BUCKET, gcs  # noqa: F401  (gcs: the GCS emulator fixture)

import llamax
from llamax import fs, pretrained, train
from llamax.cli import convert as convert_cli
from llamax.cli import eval as eval_cli
from llamax.cli import generate as generate_cli
from llamax.cli import reward as reward_cli
from llamax.metrics import read_metrics


def _step_dir(path):
    directory, step = pretrained.latest(path)
    return os.path.join(directory, str(step))


def _corrupt_copy(source, destination):
    """A copy of the checkpoint `source` with one byte flipped in the largest file of its
    latest step's parameters (a tensor chunk); the file's path relative to the step."""
    shutil.copytree(source, destination)
    step_dir = _step_dir(destination)
    walk = os.walk(os.path.join(step_dir, "params"))
    files = [os.path.join(root, name) for root, _, names in walk for name in names]
    victim = max(files, key=os.path.getsize)
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(victim, "wb").write(bytes(data))
    return os.path.relpath(victim, step_dir)


def _refused(err, victim):
    """The one `error:` line of a CLI that refused a corrupt checkpoint, checked."""
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert "is corrupt" in lines[0] and victim in lines[0], lines[0]
    assert "Nothing was read from it" in lines[0]
    assert "Traceback" not in err
    return lines[0]


# ----- item 2: every reader verifies what it reads -----


def test_generate_refuses_a_corrupt_checkpoint(tiny_lm, tmp_path, capsys):
    bad = str(tmp_path / "lm")
    victim = _corrupt_copy(tiny_lm, bad)
    code = generate_cli.main(
        ["--checkpoint", bad, "--prompt", "the model", "--max-new-tokens", "2"]
    )
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    line = _refused(captured.err, victim)
    assert line.startswith("llamax-generate: error:") and "manifest.json" in line


def test_eval_perplexity_refuses_a_corrupt_checkpoint(tiny_lm, tmp_path, capsys):
    bad = str(tmp_path / "lm")
    victim = _corrupt_copy(tiny_lm, bad)
    text = tmp_path / "text.txt"
    text.write_text("the model trains on packed documents with rotary positions\n" * 20)
    out = tmp_path / "out"
    code = eval_cli.main(["perplexity", "--checkpoint", bad, "--lengths", "16",
                          "--text", str(text), "--output", str(out)])  # fmt: skip
    assert code == 2
    _refused(capsys.readouterr().err, victim)
    assert not out.exists()


def test_reward_score_refuses_a_corrupt_reward_model(tiny_rm, tmp_path, capsys):
    bad = str(tmp_path / "rm")
    victim = _corrupt_copy(tiny_rm, bad)
    responses = tmp_path / "responses.jsonl"
    responses.write_text(json.dumps({"prompt": "2 plus 3?", "response": "5"}) + "\n")
    out = tmp_path / "scores.jsonl"
    code = reward_cli.main(["score", "--checkpoint", bad, "--input", str(responses),
                            "--output", str(out)])  # fmt: skip
    assert code == 2
    _refused(capsys.readouterr().err, victim)
    assert not out.exists()


@pytest.mark.parametrize("to", ["hf", "llamax"])
def test_a_conversion_never_launders_a_corrupt_input(tiny_lm, tmp_path, capsys, to):
    """Before the change the output was written with a fresh manifest that --verify called
    OK; now nothing is written, not even a temporary."""
    bad = str(tmp_path / "lm")
    victim = _corrupt_copy(tiny_lm, bad)
    out = tmp_path / "out"
    code = convert_cli.main(["--from", "llamax", "--to", to, "--input", bad, "--output", str(out)])
    assert code == 2
    _refused(capsys.readouterr().err, victim)
    assert sorted(os.listdir(tmp_path)) == ["lm"]  # no output, no temporary beside it


def _chat_file(directory):
    path = os.path.join(directory, "chat.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in chat_records(64))
    return path


def _pair(i):
    a, b = i % 7, (i * 3) % 5
    return {"prompt": f"What is {a} plus {b}?", "chosen": f"The answer is {a + b}.",
            "rejected": ["I do not know.", "No idea, sorry."][i % 2]}  # fmt: skip


def _pairs_file(directory):
    path = os.path.join(directory, "pairs.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(_pair(i)) + "\n" for i in range(64))
    return path


def _config(kind, data_dir, tokenizer_path, init_from, steps=2):
    """A tiny run of `kind` ("full" SFT, "lora" SFT, "dpo") from `init_from` (more `steps`
    than 2: a resumed run's)."""
    overrides = {
        "model.vocab_size": 600, "data.tokenizer": tokenizer_path, "train.steps": steps,
        "train.log_every": 1, "train.eval_every": 0, "checkpoint.every": 1,
        "checkpoint.async_save": False, "train.batch_size": 8, "train.seq_len": 64,
    }  # fmt: skip
    if kind == "dpo":
        overrides.update({"task": "dpo", "data.source": "preference",
                          "data.files": _pairs_file(data_dir), "data.pairs_per_row": 2,
                          "train.seq_len": 128, "dpo.beta": 0.5})  # fmt: skip
    else:
        overrides.update({"task": "sft", "data.source": "chat",
                          "data.files": _chat_file(data_dir)})  # fmt: skip
    if kind == "lora":
        overrides.update({"lora.rank": 4, "lora.alpha": 8.0, "lora.targets": "wq,wv"})
    c = load_config("tiny", **overrides)
    c.init_from = init_from
    c.train.accept_changes = steps > 2
    return c


@pytest.mark.parametrize(
    "kind, source",
    [("full", "tiny_run"), ("lora", "tiny_lm"), ("lora", "tiny_run"), ("dpo", "tiny_run")],
)
def test_a_corrupt_init_from_is_refused_before_the_workdir_is_written(
    kind, source, request, tokenizer_path, tmp_path
):
    """init_from (a training run's step, checked against its checksums.json, or a converted
    checkpoint, against its manifest.json), a LoRA run's base, a DPO run's start and
    reference: refused before anything is written into the new workdir."""
    bad = str(tmp_path / "base")
    victim = _corrupt_copy(request.getfixturevalue(source), bad)
    workdir = tmp_path / "run"
    with pytest.raises(
        pretrained.CorruptCheckpoint, match="init_from: the checkpoint of step"
    ) as e:
        train.run(_config(kind, str(tmp_path), tokenizer_path, bad), str(workdir))
    assert victim in str(e.value) and "Nothing was read from it" in str(e.value)
    assert isinstance(e.value, ValueError)  # one `error:` line in every CLI
    assert not workdir.exists()


def test_each_step_is_verified_once_and_only_what_a_model_reads(tiny_run, tmp_path, monkeypatch):
    """load_pretrained reads the parameters' metadata, then the parameters, and a base is
    fingerprinted: the step is hashed once, its parameters and meta only (never the
    optimizer state, twice the parameters again)."""
    run = str(tmp_path / "run")
    shutil.copytree(tiny_run, run)
    hashed = []
    checksums = fs.checksums
    monkeypatch.setattr(fs, "checksums", lambda d, names, like=None: (
        hashed.append(list(names)) or checksums(d, names, like)))  # fmt: skip
    llamax.load_pretrained(run)
    llamax.load_pretrained(run)
    pretrained.base_fingerprint(run)
    assert len(hashed) == 1, hashed
    assert hashed[0] and all(n.startswith(("params/", "meta/")) for n in hashed[0]), hashed[0]
    assert any(n.startswith("params/") for n in hashed[0])
    assert any(n.startswith("opt_state/") for n in fs.files_under(_step_dir(run)))


def test_a_checkpoint_without_checksums_loads_with_one_warning(tiny_run, tmp_path, caplog):
    run = str(tmp_path / "run")
    shutil.copytree(tiny_run, run)
    os.remove(os.path.join(_step_dir(run), "checksums.json"))
    with caplog.at_level(logging.WARNING, logger="llamax"):
        llamax.load_pretrained(run)
        first = pretrained.base_fingerprint(run)
    said = [r.getMessage() for r in caplog.records if "cannot be verified" in r.getMessage()]
    assert len(said) == 1, caplog.text
    assert "no checksums were recorded" in said[0] and _step_dir(run).rsplit("/", 1)[0] in said[0]
    # Its identity is then the hash of its parameter files: the same for a copy.
    copy = str(tmp_path / "copy")
    shutil.copytree(run, copy)
    assert pretrained.base_fingerprint(copy)["content"] == first["content"]


# ----- item 3: a base or a reference is identified by its content -----


def test_a_base_replaced_at_the_same_path_and_step_is_noticed(tiny_lm, tokenizer_path, tmp_path):
    """A converted base replaced by another model (same path, step 0): its content differs;
    a copy elsewhere has the same content (its manifest's digests travel with it)."""
    base = str(tmp_path / "base")
    shutil.copytree(tiny_lm, base)
    recorded = pretrained.base_fingerprint(base)
    assert recorded["step"] == 0 and len(recorded["content"]) == 64
    copy = str(tmp_path / "copy")
    shutil.copytree(base, copy)
    assert pretrained.base_fingerprint(copy)["content"] == recorded["content"]
    pretrained.check_same_base(recorded, copy)  # the same model elsewhere

    shutil.rmtree(base)
    config = llamax.LlamaConfig.preset("tiny", vocab_size=600)
    write_checkpoint(base, config, random_params(config, seed=99), tokenizer_path)
    with pytest.raises(ValueError, match="The LoRA base has changed: .* content "
                       f"{recorded['content'][:12]}.* adapters only fit the base"):  # fmt: skip
        pretrained.check_same_base(recorded, base)
    with pytest.raises(ValueError, match="The DPO reference has changed: .* a run keeps the "
                       "reference it started with"):  # fmt: skip
        pretrained.check_same_base(
            recorded, base, model="DPO reference", rule="a run keeps the reference it started with"
        )


def test_an_older_record_is_compared_as_it_was_with_a_warning(tiny_run, tmp_path, caplog):
    """A record of an older llamax (path, step, manifest checksum): its step compared, and a
    warning that this cannot tell another model at the same step."""
    run = str(tmp_path / "run")
    shutil.copytree(tiny_run, run)
    older = {"path": run, "step": 2, "manifest_sha256": None}
    with caplog.at_level(logging.WARNING, logger="llamax"):
        pretrained.check_same_base(older, run)
    assert "older llamax" in caplog.text and "weaker check" in caplog.text
    with pytest.raises(
        ValueError, match=r"The LoRA base has changed: .* \(step 1\), but .* has step 2"
    ):
        pretrained.check_same_base({**older, "step": 1}, run)


# ----- a LoRA and a DPO run from a training run's checkpoint, resumed -----


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_run, tokenizer_path):
    """A base (a copy of `tiny_run`: steps 1 and 2), and a 2-step LoRA run and DPO run from
    it: {"base", "data", "lora", "dpo"}."""
    root = tmp_path_factory.mktemp("finetuned")
    base = str(root / "base")
    shutil.copytree(tiny_run, base)
    out = {"base": base, "data": str(root)}
    for kind in ("lora", "dpo"):
        out[kind] = str(root / kind)
        train.run(_config(kind, str(root), tokenizer_path, base), out[kind])
    return out


class _Replaced:
    """The base's latest step (2) replaced by another model at the same path and step (its
    step 1, intact with its own checksums), put back on exit."""

    def __init__(self, base, aside):
        self.step = os.path.join(base, "checkpoints", "2")
        self.other = os.path.join(base, "checkpoints", "1")
        self.aside = aside

    def __enter__(self):
        os.rename(self.step, self.aside)
        shutil.copytree(self.other, self.step)

    def __exit__(self, *exc):
        shutil.rmtree(self.step)
        os.rename(self.aside, self.step)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "dpo"])
def test_a_resume_refuses_a_base_or_reference_replaced_at_the_same_path_and_step(
    finetuned, kind, tokenizer_path, tmp_path
):
    """Unchanged, the run resumes; with another model at init_from's path and step (which
    the old check by path and step let through: DPO's loss at step 3 changed, exit 0), the
    resume is refused naming the LoRA base or the DPO reference, before any step."""
    run = str(tmp_path / "run")
    shutil.copytree(finetuned[kind], run)
    base = finetuned["base"]
    meta = json.loads(open(os.path.join(run, "checkpoints", "2", "meta", "metadata")).read())
    key, model = (
        ("lora_base", "LoRA base") if kind == "lora" else ("dpo_reference", "DPO reference")
    )

    train.run(_config(kind, finetuned["data"], tokenizer_path, base, steps=3), run)
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]

    with _Replaced(base, str(tmp_path / "aside")):
        assert pretrained.latest(base)[1] == 2
        recorded = f"{re.escape(base)} \\(step 2, content {meta[key].get('content', '')[:12]}\\)"
        with pytest.raises(
            ValueError, match=f"The {model} has changed: the run recorded {recorded}"
        ):
            train.run(_config(kind, finetuned["data"], tokenizer_path, base, steps=4), run)
        assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
        assert not os.path.exists(os.path.join(run, "checkpoints", "4"))
        if kind == "lora":  # the run read as a model, or converted: its base is checked too
            with pytest.raises(ValueError, match="The LoRA base has changed"):
                llamax.load_pretrained(run)
            out = tmp_path / "merged"
            assert convert_cli.main(["--from", "llamax", "--to", "hf", "--input", run,
                                     "--output", str(out)]) == 2  # fmt: skip
            assert not out.exists()
    assert meta[key] == pretrained.base_fingerprint(base)  # what the run recorded


@pytest.mark.slow
def test_corrupt_adapters_of_a_lora_run_are_refused(finetuned, tmp_path, capsys):
    """A LoRA run's own checkpoint read as adapters (merged into its base, converted, exported
    to PEFT) is verified too."""
    run = str(tmp_path / "run")
    victim = _corrupt_copy(finetuned["lora"], run)
    with pytest.raises(pretrained.CorruptCheckpoint, match=victim):
        llamax.load_pretrained(run)
    with pytest.raises(pretrained.CorruptCheckpoint, match=victim):  # --to peft's reader
        pretrained.run_adapters(run)
    out = tmp_path / "merged"
    assert convert_cli.main(["--from", "llamax", "--to", "llamax", "--input", run,
                             "--output", str(out)]) == 2  # fmt: skip
    _refused(capsys.readouterr().err, victim)
    assert not out.exists()


# ----- in a bucket -----


@pytest.mark.slow
@pytest.mark.xdist_group("gcs")  # beside tests/test_gcs.py, not at the same time
@pytest.mark.usefixtures("gcs")
def test_in_a_bucket_the_recorded_object_hashes_are_compared_without_a_download(
    tiny_run, tmp_path, monkeypatch
):
    """A step recorded in a bucket (its objects' MD5) is verified from the bucket's metadata:
    nothing downloaded; a replaced object is refused; its content is the same on a local
    copy, and a local step uploaded keeps its own (sha256) content."""
    from llamax import checkpoint

    local = str(tmp_path / "run")
    shutil.copytree(tiny_run, local)
    uploaded = f"{BUCKET}/verified/uploaded"
    fs.upload(local, uploaded)
    assert pretrained.base_fingerprint(uploaded) == {
        **pretrained.base_fingerprint(local),
        "path": uploaded,
    }

    bucket_run, tampered = f"{BUCKET}/verified/run", f"{BUCKET}/verified/tampered"
    for remote in (bucket_run, tampered):
        fs.upload(local, remote)
        checkpoint.record_checksums(f"{remote}/checkpoints/2")  # as a run in a bucket does
    victim = "params/ocdbt.process_0/manifest.ocdbt"
    filesystem, inner = fs._fs(tampered)
    filesystem.copy(f"{inner}/checkpoints/1/{victim}", f"{inner}/checkpoints/2/{victim}")

    read = []
    digest = fs._digest
    monkeypatch.setattr(fs, "_digest", lambda path, d: read.append(path) or digest(path, d))
    fingerprint = pretrained.base_fingerprint(bucket_run)
    with pytest.raises(pretrained.CorruptCheckpoint, match=f"{victim} differs from its checksum"):
        pretrained.base_fingerprint(tampered)
    assert read == []  # compared with the bucket's own hashes
    monkeypatch.undo()

    downloaded = tmp_path / "downloaded"
    filesystem.get(inner.replace("tampered", "run"), str(downloaded), recursive=True)
    assert pretrained.base_fingerprint(str(downloaded))["content"] == fingerprint["content"]
