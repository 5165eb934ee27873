"""Every experiment config loads; every `--config.*` key the docs name exists; every command
the docs name is installed and answers `--help`. (A misspelt key on the command line:
tests/test_first_day.py.)"""

import configparser
import glob
import os
import re

import pytest
from conftest import REPO, load_config, run_cli

import llamax
from llamax import experiment, metrics

CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py")))
DOCS = [os.path.join(REPO, "README.md"), *glob.glob(os.path.join(REPO, "docs", "*.md"))]
DOCS += glob.glob(os.path.join(REPO, "configs", "*.py"))


def test_expected_configs_exist():
    assert {"tiny", "demo", "llama2_7b", "llama2_13b", "llama2_70b"} <= set(CONFIGS)
    assert {"llama2_7b_extend_16k", "llama2_7b_extend_32k"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_resolves(name):
    c = load_config(name)
    # It states its task: the one llamax inferred from its data and head before tasks were
    # explicit, so that the run is the one it was.
    assert c.task and c.task == experiment.derive_task(c.data.source, experiment.head(c)), name
    model = experiment.model_config(c)
    experiment.execution_config(c)  # valid execution settings
    assert c.train.batch_size % c.train.grad_accum_steps == 0
    assert metrics.flops_per_token(model, c.train.seq_len) > 0
    with open(os.path.join(REPO, "configs", f"{name}.py")) as f:
        docstring = f.read().split('"""')[1]
    assert f"configs/{name}.py" in docstring, "the docstring gives the command"
    assert "Hardware" in docstring and "Expected" in docstring


@pytest.mark.parametrize("stage, task", [("sft", "sft"), ("lora", "sft"), ("reward", "reward"),
                                         ("dpo", "dpo")])  # fmt: skip
def test_each_walkthrough_stage_states_its_task(stage, task):
    import importlib.util

    spec = importlib.util.spec_from_file_location("w", os.path.join(REPO, "configs",
                                                                    "walkthrough.py"))  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(stage)
    assert c.task == task == experiment.derive_task(c.data.source, experiment.head(c))
    experiment.check(c)


def test_full_size_configs_use_the_presets():
    for size in ("7b", "13b", "70b"):
        c = load_config(f"llama2_{size}")
        assert experiment.model_config(c) == llamax.LlamaConfig.preset(f"llama2-{size}")
        run = experiment.execution_config(c)
        assert (run.dtype, run.param_dtype, run.remat_policy) == ("bfloat16", "float32", "full")
        assert c.train.seq_len == 4096 and c.train.batch_size * c.train.seq_len == 4 * 2**20


def test_every_documented_override_exists():
    defaults = experiment.default_config()
    found = set()
    for path in DOCS:
        with open(path) as f:
            found.update(re.findall(r"--config\.([a-z_]+(?:\.[a-z_0-9]+)+)", f.read()))
    assert found, "the docs name no overrides"
    for key in sorted(found):
        node = defaults
        for part in key.split("."):
            assert part in node, f"--config.{key} (in the docs) is not a config key"
            node = node[part]


@pytest.mark.parametrize("length, factor", [(16384, 4.0), (32768, 8.0)])
def test_context_extension_configs_follow_the_paper(length, factor):
    """Chen et al. 2023: linear interpolation by L / 4096, 1,000 steps at 2e-5, no decay."""
    c = load_config(f"llama2_7b_extend_{length // 1024}k")
    model, run = experiment.model_config(c), experiment.execution_config(c)
    assert model.rope_scaling == {"rope_type": "linear", "factor": factor}
    assert model.max_seq_len == c.train.seq_len == length
    assert run.attention == "auto" and run.remat_policy == "full" and run.dtype == "bfloat16"
    assert c.optimizer.learning_rate == 2e-5 and c.optimizer.end_learning_rate_ratio == 1.0
    assert c.optimizer.weight_decay == 0.0 and c.train.steps == 1000
    assert model.replace(rope_scaling=None, max_seq_len=4096) == model.preset("llama2-7b")


def _keys(node, prefix=""):
    for key, value in node.items():
        if hasattr(value, "items"):
            yield from _keys(value, f"{prefix}{key}.")
        else:
            yield prefix + key


def test_config_reference_lists_every_key():
    with open(os.path.join(REPO, "docs", "config.md")) as f:
        reference = f.read()
    missing = [k for k in _keys(experiment.default_config()) if f"| `{k}` |" not in reference]
    assert not missing, f"docs/config.md does not describe {missing}"


def _console_scripts():
    setup = configparser.ConfigParser()
    setup.read(os.path.join(REPO, "setup.cfg"))
    scripts = setup["options.entry_points"]["console_scripts"]
    return sorted(line.split("=")[0].strip() for line in scripts.splitlines() if line.strip())


def test_every_command_named_in_the_docs_exists():
    commands = set(_console_scripts())
    named = set()
    for path in DOCS:
        with open(path) as f:
            named.update(re.findall(r"(?<![/\w.-])(llamax-[a-z]+)\b", f.read()))
    assert named, "the docs name no commands"
    assert named <= commands, f"named in the docs but not installed: {named - commands}"


# What each command's --help shows: its key flags (or subcommands).
HELP = {
    "llamax-train": ["--workdir", "--config", "--coordinator", "--num_processes"],
    "llamax-aot": ["--topology", "--json", "--num_slices", "--config"],
    "llamax-convert": ["--from", "--to", "--input", "--output", "--verify"],
    "llamax-eval": ["perplexity", "passkey"],
    "llamax-generate": ["--checkpoint", "--prompt", "--max-new-tokens", "--chat"],
    "llamax-gatt": ["--checkpoint", "--dialogs", "--output", "--instructions", "--turns"],
    "llamax-reward": ["score", "eval", "sample"],
    "llamax-tokenizer": ["train", "encode"],
}


def test_every_command_has_its_help_checked():
    assert sorted(HELP) == _console_scripts()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HELP))
def test_each_installed_command_answers_help(name):
    """The installed command starts, prints its help (its docstring, its key flags) on stdout
    and exits 0 (absl's exit 1, which llamax-train and llamax-aot turn into 0); an absl
    command's unknown flag is one `error:` line and exit code 2."""
    result = run_cli(name, "--help", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "Traceback" not in out + result.stderr and "error" not in result.stderr, out[-2000:]
    for flag in HELP[name]:
        assert flag in out, (flag, out[-2000:])
    if name in ("llamax-train", "llamax-aot"):  # absl: the module's docstring and flags
        assert out.startswith(f"`{name} --config configs/X.py"), out[:500]
        assert "--config: Experiment config file." in out
        bad = run_cli(name, "--no_such_flag", timeout=120)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
        errors = [line for line in bad.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and errors[0].startswith(f"{name}: error:"), bad.stderr[-2000:]
    else:  # argparse's usage line
        assert out.startswith(f"usage: {name} "), out[:500]


@pytest.mark.parametrize(
    "key, value, message",
    [("train.log_every", -1, "train.log_every must be an integer >= 0"),
     ("train.batch_size", 0, "train.batch_size must be an integer >= 1"),
     ("train.seq_len", 1, "train.seq_len must be an integer >= 2"),
     ("train.steps", -5, "train.steps must be an integer >= 1"),
     ("checkpoint.keep", 0, "checkpoint.keep must be an integer >= 1"),
     ("train.z_loss", -1.0, "train.z_loss must be a finite number >= 0"),
     ("cluster.heartbeat_timeout_seconds", 0, "heartbeat_timeout_seconds must be positive"),
     ("optimizer.b2", 1.0, "optimizer.b2 cannot be 1.0"),
     ("optimizer.learning_rate", float("nan"), "optimizer.learning_rate cannot be nan"),
     ("optimizer.weight_decay_exclude", "(", "not a regular expression"),
     ("data.markov_states", 1, "data.markov_states must be an integer >= 2"),
     ("data.validation_fraction", 1.0, "data.validation_fraction must be in"),
     ("model.attention", "flash", "attention must be one of"),
     ("model.norm_eps", float("nan"), "norm_eps must be a finite positive number")],
)  # fmt: skip
def test_values_no_run_could_use_are_named_before_anything_is_written(tmp_path, key, value,
                                                                     message):  # fmt: skip
    from llamax import train

    c = load_config("tiny", **{key: value})
    with pytest.raises(ValueError, match=message):
        train.run(c, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
