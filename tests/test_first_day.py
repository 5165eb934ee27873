"""What a newcomer trips over on a first day: discoverable flags, one-line errors with the
fix, command-line rotary scalings, a tokenizer sampled from the whole corpus, no noise and
no empty workdir left behind. (gs:// storage: tests/test_gcs.py.)"""

import configparser
import json
import os

import numpy as np
import pytest
from conftest import REPO, WORDS, load_config, run_cli

from llamax import train
from llamax.data import corpus

# (Each command's --help: tests/test_configs.py.)


@pytest.mark.slow
def test_a_misspelt_key_is_one_line_with_the_suggestion(tmp_path):
    """And a missing config file: one line naming it; exit code 2, no traceback, no run."""
    workdir = tmp_path / "run"
    result = run_cli("llamax-train", "--config=configs/tiny.py", f"--workdir={workdir}",
                     "--config.train.step=20")  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llamax-train: error:"), lines
    assert 'Did you mean "steps"' in lines[0]
    assert not workdir.exists()
    missing = run_cli("llamax-train", "--config=configs/nope.py", f"--workdir={workdir}")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llamax-train: error:"), lines
    assert "configs/nope.py" in lines[0]
    assert not workdir.exists()


@pytest.mark.slow
def test_rope_scaling_is_set_on_the_command_line(tmp_path):
    """`--config.model.rope_scaling.*` overrides, parsed as llamax-train parses its flags
    (`llamax.cli.load_config`: ml_collections' config flags, locked), in the resolved model
    of the run's config.json."""
    from llamax.cli import load_config as cli_load_config

    c = cli_load_config(f"{REPO}/configs/tiny.py", [
        "--config.train.steps=1", "--config.train.progress_bar=false",
        "--config.model.rope_scaling.rope_type=linear", "--config.model.rope_scaling.factor=4",
    ])  # fmt: skip
    train.run(c, str(tmp_path))
    resolved = json.loads((tmp_path / "config.json").read_text())["model"]["resolved"]
    assert resolved["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


@pytest.mark.slow
def test_too_few_devices_says_how_to_get_more(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    result = run_cli("llamax-train", "--config=configs/tiny.py", f"--workdir={tmp_path}",
                     "--config.mesh.data=2", env=env)  # fmt: skip
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "XLA_FLAGS=--xla_force_host_platform_device_count" in line
    assert "--config.mesh" in line
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # no empty workdir left


def test_the_tokenizer_sample_spans_every_file(tmp_path):
    """Before: the first `--max-lines` lines in file order, i.e. the first files only."""
    for i in range(20):
        (tmp_path / f"part{i:02d}.txt").write_text(
            "".join(f"file {i} line {j}\n" for j in range(50))
        )
    sample = corpus.sample_lines(str(tmp_path / "*.txt"), "text", max_lines=100, seed=0)
    files = {line.split()[1] for line in sample}
    assert len(sample) == 100 and len(files) >= 15  # about 5 lines of each of the 20 files
    assert sample == corpus.sample_lines(str(tmp_path / "*.txt"), "text", 100, seed=0)
    assert sample != corpus.sample_lines(str(tmp_path / "*.txt"), "text", 100, seed=1)


def test_tokenizer_cli_mistakes_are_one_line(tmp_path, tokenizer_path, capfd):
    """llamax-tokenizer's main in this process; its output and sentencepiece's (file
    descriptors 1 and 2) are read."""
    from llamax.cli import tokenizer as tokenizer_cli

    def run(*argv):
        code = tokenizer_cli.main(list(argv))
        return code, capfd.readouterr().err

    args = ["train", "--input", f"{REPO}/README.md"]
    code, err = run(*args, "--vocab-size", "300", "--output", tokenizer_path)
    assert code == 2 and "exists" in err
    (tmp_path / "empty.txt").write_text("")
    code, err = run("train", "--input", str(tmp_path / "empty.txt"), "--vocab-size", "300",
                    "--output", str(tmp_path / "a.model"))  # fmt: skip
    assert code == 2 and "No text" in err
    code, err = run(*args, "--vocab-size", "1000000", "--output", str(tmp_path / "b.model"))
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "is more pieces than the text can make" in errors[0], err
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".model") or ".tmp" in p]


@pytest.mark.slow
def test_log_every_zero_logs_the_last_step_only(tmp_path):
    train.run(load_config("tiny", **{"train.steps": 3, "train.log_every": 0,
                                     "train.eval_every": 0}), str(tmp_path))  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3]


def test_vocab_advice_fits_training_from_scratch(tmp_path, tokenizer_path, text_corpus):
    c = load_config("tiny", **{"data.source": "tfds", "data.files": f"{text_corpus[0]}/*.txt",
                               "data.tokenizer": tokenizer_path,
                               "data.tfds_data_dir": str(tmp_path / "tfds")})  # fmt: skip
    with pytest.raises(ValueError, match=r"set --config.model.vocab_size=\d+"):
        train.run(c, str(tmp_path / "run"))


def test_a_local_corpus_builds_quietly(tmp_path, text_corpus, capfd):
    """Nothing on stdout or stderr (file descriptors 1 and 2: tfds's announcement, its bars)."""
    builder = corpus.build_corpus(f"{text_corpus[0]}/*.txt", f"{tmp_path}/tfds", "text", 0.2)
    assert builder.is_prepared()
    out, err = capfd.readouterr()
    assert "Downloading and preparing" not in out + err and not out.strip(), out + err
    assert "%|" not in err, err  # no progress bar


@pytest.mark.slow  # tiny_run trains
def test_the_tensorboard_viewer_reads_the_runs_scalars(tiny_run):
    """TensorBoard's own reader finds every scalar of metrics.jsonl, at its step, in the run's
    tensorboard/ events; and the `tensorboard` extra installs the viewer."""
    from tensorboard.backend.event_processing import event_accumulator

    from llamax.metrics import read_metrics

    events = event_accumulator.EventAccumulator(os.path.join(tiny_run, "tensorboard"),
                                                size_guidance={"scalars": 0})  # fmt: skip
    events.Reload()
    want = {}
    for record in read_metrics(tiny_run):
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                want.setdefault(key, []).append((record["step"], np.float32(value)))
    assert "loss" in want and [s for s, _ in want["loss"]] == [1, 2]
    assert sorted(events.Tags()["scalars"]) == sorted(want)
    for key, points in want.items():
        got = [(e.step, np.float32(e.value)) for e in events.Scalars(key)]
        assert got == points, key
    setup = configparser.ConfigParser()
    setup.read(os.path.join(REPO, "setup.cfg"))
    extra = setup["options.extras_require"]["tensorboard"].split()
    assert any(line.startswith("tensorboard>=") for line in extra), extra


def _one_text_file(directory, size=1_300_000):
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, 12)) for _ in range(size // 80)]
    (directory / "book.txt").write_text("\n".join(lines))
    return str(directory / "book.txt")


@pytest.mark.slow
def test_a_single_text_file_is_a_corpus_with_a_validation_split(tmp_path, tokenizer_path):
    """Before: a one-document corpus left validation empty and tfds refused to write it."""
    book = _one_text_file(tmp_path)
    builder = corpus.build_corpus(book, str(tmp_path / "tfds"), "text", 0.05)
    train_records = corpus.data_source(builder, "train")
    held_out = corpus.data_source(builder, "validation")
    assert len(held_out) >= 1 and len(train_records) >= 4 * len(held_out)
    texts = [corpus.record_text(s[i], "text") for s in (train_records, held_out)
             for i in range(len(s))]  # fmt: skip
    assert sorted(texts) == sorted(corpus.split_text(open(book).read(), corpus.PART_CHARS))
    c = load_config("tiny", **{"data.source": "tfds", "data.files": book,
                               "data.tokenizer": tokenizer_path, "model.vocab_size": 640,
                               "data.tfds_data_dir": str(tmp_path / "tfds"),
                               "train.steps": 4, "train.eval_every": 2})  # fmt: skip
    train.run(c, str(tmp_path / "run"))
    assert "eval_loss" in json.loads((tmp_path / "run" / "metrics.jsonl").read_text()
                                     .splitlines()[-1])  # fmt: skip


@pytest.mark.slow
def test_an_eval_without_a_validation_split_stops_before_step_0(tmp_path, tokenizer_path):
    """Before: trained, then crashed at the first eval, losing the steps since a save."""
    book = _one_text_file(tmp_path)
    c = load_config("tiny", **{"data.source": "tfds", "data.files": book,
                               "data.tokenizer": tokenizer_path, "model.vocab_size": 640,
                               "data.tfds_data_dir": str(tmp_path / "tfds"),
                               "data.validation_fraction": 0.0, "train.eval_every": 2})  # fmt: skip
    with pytest.raises(ValueError, match="no 'validation' split .* train.eval_every=0"):
        train.run(c, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    c.train.eval_every, c.train.steps = 0, 1  # no eval: no validation split needed
    train.run(c, str(tmp_path / "run"))


@pytest.mark.slow
def test_generation_and_evaluation_find_or_refuse_what_they_are_given(
    tmp_path, tiny_run, text_corpus, capsys
):
    from conftest import hf_model

    import llamax
    from llamax.cli import eval as eval_cli
    from llamax.cli import generate as generate_cli

    hf_model(llamax.LlamaConfig.preset("tiny")).save_pretrained(tmp_path / "hf")
    prompt = ["--prompt", "the model", "--max-new-tokens", "3"]
    assert generate_cli.main(["--checkpoint", str(tmp_path / "hf"), *prompt]) == 2
    assert "convert it first, llamax-convert --from hf --to llamax" in capsys.readouterr().err

    missing = ["perplexity", "--checkpoint", str(tmp_path / "nowhere"), "--lengths", "16",
               "--output", str(tmp_path / "eval"), "--text", f"{text_corpus[0]}/*.txt"]  # fmt: skip
    assert eval_cli.main(missing) == 2
    assert "No checkpoint at" in capsys.readouterr().err  # not a complaint about a tokenizer

    workdir = tiny_run  # a training run's workdir keeps its tokenizer
    assert generate_cli.main(["--checkpoint", str(workdir), *prompt]) == 0
    other = tmp_path / "other.model"
    corpus_lines = [f"other words {i} entirely" for i in range(300)]
    from llamax.data.tokenizer import train_tokenizer

    train_tokenizer(corpus_lines, str(other), vocab_size=320)
    capsys.readouterr()
    assert generate_cli.main(["--checkpoint", str(workdir), "--tokenizer", str(other),
                              *prompt]) == 2  # fmt: skip
    assert "is not the tokenizer of" in capsys.readouterr().err

    # init_from may name one step's directory (complete, though not a workdir).
    continued = load_config("tiny", **{"train.steps": 1, "train.eval_every": 0})
    continued.model.vocab_size = 600
    continued.init_from = os.path.join(workdir, "checkpoints", "2")
    train.run(continued, str(tmp_path / "continued"))
