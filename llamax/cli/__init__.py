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


def setup_logging(fmt: str = "%(message)s") -> None:
    """llamax's own progress at INFO on stderr; JAX, orbax, absl and the rest at WARNING."""
    logging.basicConfig(level=logging.WARNING, format=fmt, stream=sys.stderr)
    logging.getLogger().setLevel(logging.WARNING)  # also under absl.app, which sets INFO
    logging.getLogger("llamax").setLevel(logging.INFO)
