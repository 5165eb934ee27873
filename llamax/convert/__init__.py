"""Conversion between Meta's release layout, Hugging Face, and llamax checkpoints: the only
code that knows foreign names, layouts and config fields.

- `core`: `convert(src, dst, input_dir, output_dir)`, atomic, tensor by tensor.
- `meta`: Meta's `params.json` and `consolidated.NN.pth` shards.
- `hf`: Hugging Face's `config.json`, state dicts and safetensors directories.
- `native`: llamax's own format (orbax), read lazily and written layer by layer.
- `manifest`: `manifest.json` and `verify`.
- `formats`: lazy `.pth` and safetensors readers without torch, a safetensors writer.
"""

from llamax.convert.core import FORMATS, convert, read
from llamax.convert.formats import FormatError
from llamax.convert.manifest import verify

__all__ = ["FORMATS", "FormatError", "convert", "read", "verify"]
