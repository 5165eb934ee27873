"""llamax: pretrain and continue training Llama 2 in JAX/Flax, TPU first."""

from llamax.config import LlamaConfig
from llamax.model import Llama

__all__ = ["Llama", "LlamaConfig"]
__version__ = "0.1.0"
