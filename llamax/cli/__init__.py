"""Command-line entry points (`llamax-*`, see setup.cfg)."""

from __future__ import annotations

import logging
import os
import sys
import warnings


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
