"""Command-line entry points (`llamax-*`, see setup.cfg)."""

from __future__ import annotations

import logging
import sys


def error(prog: str, e: BaseException) -> int:
    """Reports a user error as one line on stderr; the exit code for bad input."""
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2


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
    failure once, as a `CheckpointError` naming the step."""

    def filter(self, record: logging.LogRecord) -> bool:
        from_writer = "orbax" in record.pathname or record.name == "asyncio"
        return not (record.levelno >= logging.ERROR and from_writer)


def setup_logging(fmt: str = "%(message)s") -> None:
    """llamax's own progress at INFO on stderr; JAX, orbax, absl and the rest at WARNING."""
    logging.basicConfig(level=logging.WARNING, format=fmt, stream=sys.stderr)
    logging.getLogger().setLevel(logging.WARNING)  # also under absl.app, which sets INFO
    logging.getLogger("llamax").setLevel(logging.INFO)
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_ReportedOnce())
    sys.unraisablehook = _unraisable


def _unraisable(unraisable) -> None:
    """After a failed save, tensorstore completes the writes orbax abandoned, into an event
    loop orbax has closed: each is an unraisable `RuntimeError` printed as a traceback. The
    failure itself is reported once; everything else goes to Python's own hook."""
    if not (
        isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"
    ):
        sys.__unraisablehook__(unraisable)
