"""llamax: pretrain and continue training Llama 2 in JAX/Flax, TPU first."""

from llamax.checkpoint import load_pretrained
from llamax.config import LlamaConfig
from llamax.generate import generate
from llamax.model import Llama

__all__ = ["Llama", "LlamaConfig", "generate", "load_pretrained"]
__version__ = "0.1.0"
