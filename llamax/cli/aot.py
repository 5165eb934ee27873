"""`llamax-aot --config configs/X.py --topology v5e-16 [--num_slices N] [--json FILE]`.

Compiles the config's train step for a TPU slice on this machine (libtpu from PyPI is enough;
no TPU needed) and prints per-chip memory (arguments, temporaries, output, peak) against the
chip's HBM, whether it fits, the compile time and the model FLOPs per step. `--config.KEY=V`
overrides work as in `llamax-train`, e.g. `--config.train.batch_size=32`. Exits 1 when the
step does not fit, 2 on bad input (an unknown slice, a mesh that does not fit it). A PPO
config (`task = "ppo"`) is measured as its iteration (`aot.check_ppo`): the policy's and the
value model's update steps compiled, each beside the other's state, and the rollouts' phase.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from llamax.cli import config_value, error, run_absl, setup_logging, usage_error

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, e.g. v5e-16, v5p-128, v4-8.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices (multi-slice over DCN).")
_JSON = flags.DEFINE_string("json", None, "Also write the report to this JSON file.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        sys.exit(usage_error("llamax-aot", f"unexpected arguments: {argv[1:]}"))
    c = config_value(_CONFIG, "llamax-aot")
    if c is None or _TOPOLOGY.value is None:
        sys.exit(usage_error("llamax-aot", "--config and --topology are required"))
    setup_logging()
    from llamax import aot, experiment, fs

    try:
        ppo = experiment.resolve_task(c).task == "ppo"
        report = (aot.check_ppo if ppo else aot.check)(c, _TOPOLOGY.value, _NUM_SLICES.value)
    except (ValueError, RuntimeError, OSError) as e:
        sys.exit(error("llamax-aot", e))
    print((aot.format_ppo_report if ppo else aot.format_report)(report))
    if _JSON.value:
        fs.write_json(_JSON.value, report, indent=1)
    sys.exit(0 if report["fits"] else 1)


def run() -> None:
    run_absl(main, __name__)


if __name__ == "__main__":
    run()
