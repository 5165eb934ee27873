"""llamax: pretrain and continue training Llama 2 in JAX/Flax, TPU first."""

# First: with STORAGE_EMULATOR_HOST set, it configures the storage clients before they load.
from llamax import fs  # noqa: F401  isort: skip

from llamax import cluster
from llamax.config import LlamaConfig
from llamax.execution import Execution
from llamax.generation import generate
from llamax.loading import load_pretrained
from llamax.model import Llama

cluster.threads_for_simulated_devices()  # before JAX starts its CPU backend

__all__ = ["Execution", "Llama", "LlamaConfig", "generate", "load_pretrained"]
__version__ = "0.1.0"
