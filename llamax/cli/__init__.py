"""Command-line entry points (`llamax-*`, see setup.cfg), and what they share: one error line
for bad input, the flags of a command that runs a checkpoint (`add_model_flags`) or samples
(`add_sampling_flags`), one loader of experiment config files (`load_config`, as llamax-train
reads `--config`), and logging."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence


def error(prog: str, e: BaseException) -> int:
    """Reports a user error as one line on stderr; the exit code for bad input."""
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2


def usage_error(prog: str, message: str) -> int:
    return error(prog, f"{message} (see {prog} --help)")


def run_absl(main, module_name: str) -> None:
    """`absl.app.run(main)` for a command whose flags are defined in `module_name`: `--help`
    shows that module's docstring and flags (absl shows only the key flags of `sys.argv[0]`,
    a console-script wrapper with none) and exits 0 (absl exits 1 after printing it), and a
    bad flag or a misspelt config key is one `error:` line (exit 2) instead of a traceback."""
    from absl import app, flags

    module = sys.modules[module_name]
    prog = os.path.basename(sys.argv[0])
    sys.modules["__main__"].__doc__ = module.__doc__
    for flag in flags.FLAGS.get_key_flags_for_module(module_name):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)

    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except SystemExit as e:
            # While flags are parsed, only absl's help flags (--help, --helpfull, ...) exit,
            # and with 1, once their text is printed: asking for help is no failure.
            sys.exit(0 if e.code == 1 else e.code)
        except Exception as e:  # absl's flags errors, ml_collections' unknown keys
            sys.exit(usage_error(prog, flag_error_text(e)))

    app.run(main, flags_parser=parse)


def flag_error_text(e: BaseException) -> str:
    """One line of an absl flags error or of ml_collections' unknown config key (whose
    message is the key and the close matches, over several quoted lines)."""
    text = str(e).replace("\\n", "\n").replace("\\'", "'")
    lines = [line.strip("'\" ") for line in text.splitlines() if line.strip("'\" ")]
    if isinstance(e, KeyError | AttributeError) and len(lines) > 1:  # ml_collections
        lines[0] = f"no config key {lines[0]!r}:"
    return " ".join(lines)


def config_value(flag, prog: str):
    """The experiment config of a `--config` flag; a file that does not load (missing, or a
    Python error in it) is one `error:` line."""
    try:
        value = flag.value
        if value is not None:
            value.keys()  # ml_collections defers a load error to the first access
        return value
    except Exception as e:
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[-3:])
        sys.exit(error(prog, f"cannot load the --config file: {detail}"))


def load_config(spec: str, overrides: Sequence[str] = (), flag: str = "--config"):
    """The experiment config of a config file, read as llamax-train reads its `--config`
    (ml_collections' `config_flags`: `configs/X.py`, or `configs/X.py:ARG` for
    `get_config(ARG)`; locked), with `--config.KEY=VALUE` overrides (or `--config.KEY VALUE`)
    applied as llamax-train applies them, each value typed as its key's own. A file that does
    not load, an unknown key or a bad value is a `ValueError` (`FileNotFoundError` for a
    missing file) naming it, `flag` naming the config ("--finetune")."""
    from absl import flags
    from ml_collections import config_dict, config_flags

    from llamax import fs

    path = spec.split(":", 1)[0]
    if not fs.isfile(path):
        raise FileNotFoundError(f"{flag}: no config file {path}")

    def parse(argv):
        values = flags.FlagValues()
        holder = config_flags.DEFINE_config_file(
            "config", None, "the experiment config", flag_values=values, lock_config=True,
            sys_argv=["llamax", *argv],
        )  # fmt: skip
        with warnings.catch_warnings():  # ml_collections' own loader uses load_module()
            warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
            rest = values(["llamax", *argv])
        value = holder.value
        value.keys()  # ml_collections defers a load error to the first access
        return value, rest[1:]

    try:
        c, _ = parse([f"--config={spec}"])
    except Exception as e:  # the file's own error, whatever it is
        raise ValueError(f"{flag}: cannot load the config file {spec}: "
                         f"{type(e).__name__}: {flag_error_text(e)}") from None  # fmt: skip
    for arg in overrides:
        if not arg.startswith("--config."):
            continue  # the value of the override before it (--config.KEY VALUE)
        key = arg.removeprefix("--config.").partition("=")[0]
        node = c
        for part in key.split("."):
            if not isinstance(node, config_dict.ConfigDict) or part not in node:
                raise ValueError(f"--config.{key}: no config key {key!r} in {flag} {spec}")
            node = node[part]
    try:
        c, rest = parse([f"--config={spec}", *overrides])
    except Exception as e:  # absl's flags errors: a value that is not of the key's type
        raise ValueError(f"{flag} {spec}: {flag_error_text(e)}") from None
    if rest:
        raise ValueError(f"unexpected arguments after the --config overrides: {rest}")
    return c


def refuse_existing(flag: str, path: str | None) -> None:
    """An output that exists is not overwritten: a `FileExistsError` naming it."""
    from llamax import fs

    if path and fs.exists(path):
        raise FileExistsError(f"{flag} {path} exists; remove it or choose another path")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def add_model_flags(parser, what: str = "converted checkpoint or workdir",
                    adapters: bool = True, batch_size: int | None = None) -> None:  # fmt: skip
    """The flags of a command that runs a checkpoint, the same in each: `--checkpoint`
    (`what` it must be), `--tokenizer`, `--adapters` (LoRA adapters merged in, unless
    `adapters` is False), `--batch-size` (rows a call, default `batch_size`; none when None),
    `--dtype` and `--attention` (`add_execution_flags`). `model_options(args)` gives
    `llamax.loading.load_engine` what they say."""
    parser.add_argument("--checkpoint", required=True, help=what)
    parser.add_argument("--tokenizer", help="default: CHECKPOINT/tokenizer.model")
    if adapters:
        parser.add_argument("--adapters", help="LoRA adapters on the checkpoint: PEFT dir or run")
    if batch_size is not None:
        parser.add_argument("--batch-size", type=_positive_int, default=batch_size,
                            help="rows a call (fewer when there are fewer)")  # fmt: skip
    add_execution_flags(parser)


def model_options(args) -> dict:
    """The loading options of `add_model_flags`' flags, for `llamax.loading.load_engine`."""
    return {"tokenizer": args.tokenizer, "adapters": getattr(args, "adapters", None),
            "dtype": args.dtype, "attention": args.attention}  # fmt: skip


def add_sampling_flags(parser, max_new_tokens: int = 64, temperature: float = 0.0) -> None:
    """`--max-new-tokens`, `--temperature`, `--top-p`, `--top-k` and `--seed`: the fields of
    `llamax.inference.SamplingConfig` (`sampling_config` checks them)."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                        help="new tokens at most, each answer")  # fmt: skip
    parser.add_argument("--temperature", type=float, default=temperature, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (1: no cut)")
    parser.add_argument("--top-k", type=int, default=0, help="most likely tokens kept (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="of the random streams")


def sampling_config(parser, args):
    """The `SamplingConfig` of `add_sampling_flags`' flags; a bad one is argparse's usage
    error naming the flag."""
    from llamax.inference import SamplingConfig

    try:
        return SamplingConfig.from_flags(args)
    except ValueError as e:
        parser.error(str(e))


def add_execution_flags(parser) -> None:
    """`--dtype` and `--attention` for the commands that load a checkpoint to run it."""
    from llamax.attention import BACKENDS
    from llamax.execution import DTYPES

    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype")
    parser.add_argument(
        "--attention", default="auto", choices=BACKENDS,
        help="attention backend (auto: the platform's fused kernel where it applies)",
    )  # fmt: skip


class _ReportedOnce(logging.Filter):
    """Drops the tracebacks orbax logs for a failed background save (once per item, again
    when it is waited for) and those asyncio logs for its write tasks: llamax reports that
    failure once, as a `CheckpointError` naming the step. Drops tfds' warnings about a local
    corpus (its "custom data configuration", its missing dataset_info.json) too."""

    def filter(self, record: logging.LogRecord) -> bool:
        from_writer = "orbax" in record.pathname or record.name == "asyncio"
        if record.levelno >= logging.ERROR and from_writer:
            return False
        return not ("tensorflow_datasets" in record.pathname and record.levelno < logging.ERROR)


def setup_logging(fmt: str = "%(message)s") -> None:
    """llamax's own progress at INFO on stderr; JAX, orbax, absl and the rest at WARNING."""
    logging.basicConfig(level=logging.WARNING, format=fmt, stream=sys.stderr)
    logging.getLogger().setLevel(logging.WARNING)  # also under absl.app, which sets INFO
    logging.getLogger("llamax").setLevel(logging.INFO)
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_ReportedOnce())
    sys.unraisablehook = _unraisable
    # The writes a failed save abandoned can leave coroutines never awaited, which Python
    # reports as it exits, after llamax's one error line, whenever they happen to be collected.
    warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)


def _unraisable(unraisable) -> None:
    """After a failed save, tensorstore completes the writes orbax abandoned, into an event
    loop orbax has closed: each is an unraisable `RuntimeError` printed as a traceback. The
    failure itself is reported once; everything else goes to Python's own hook."""
    if not (
        isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"
    ):
        sys.__unraisablehook__(unraisable)
