"""Command-line entry points (`llamax-*`, see setup.cfg)."""

from __future__ import annotations

import logging
import sys


def setup_logging(fmt: str = "%(message)s") -> None:
    """llamax's own progress at INFO on stderr; JAX, orbax, absl and the rest at WARNING."""
    logging.basicConfig(level=logging.WARNING, format=fmt, stream=sys.stderr)
    logging.getLogger().setLevel(logging.WARNING)  # also under absl.app, which sets INFO
    logging.getLogger("llamax").setLevel(logging.INFO)
