"""Tasks: what a run trains, one module each (`lm`, `sft`, `reward`, `dpo`, and `ppo` with its
value model's `ppo_value`), chosen by the
experiment config's `task` (`llamax.tasks.base` says what a task owns). Importing the package
registers the built-in ones; `register` adds a task defined elsewhere."""

from llamax.tasks import dpo, lm, ppo, reward, sft
from llamax.tasks.base import Beside, Field, Task, get, names, register

__all__ = ["Beside", "Field", "Task", "get", "names", "register", "dpo", "lm", "ppo", "reward",
           "sft"]  # fmt: skip
