"""SentencePiece tokenizer with Llama 2's conventions, and training one from a corpus.

Meta's `llama/tokenizer.py` semantics: ids are `sp.encode(text)`, with BOS (1) prepended and
EOS (2) appended when asked; UNK is 0 and there is no pad id. `Tokenizer` loads Meta's
`tokenizer.model` as it is. `train_tokenizer` trains a BPE model with byte fallback and
Llama's settings (digits split, whitespace kept as is, no normalization), for pretraining
from scratch, the demo and tests.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from llamax import fs

UNK, BOS, EOS = 0, 1, 2


class Tokenizer:
    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"Tokenizer model not found: {model_path}")
        self.path = model_path
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.unk_id, self.pad_id = self.sp.unk_id(), self.sp.pad_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Meta's `Tokenizer.encode(s, bos, eos)`."""
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_array(self, text: str, bos: bool = True, eos: bool = True) -> np.ndarray:
        return np.asarray(self.encode(text, bos, eos), dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


def train_tokenizer(
    texts: Iterable[str],
    output_path: str,
    vocab_size: int,
    max_sentence_length: int = 1 << 16,
    input_sentence_size: int = 2_000_000,
) -> Tokenizer:
    """Trains a BPE SentencePiece model on `texts` and writes it atomically to `output_path`."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,  # bytes never seen in training still round-trip
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        character_coverage=0.99995,
        unk_id=UNK,
        bos_id=BOS,
        eos_id=EOS,
        pad_id=-1,
        max_sentence_length=max_sentence_length,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    fs.write_bytes(output_path, model.getvalue())
    return Tokenizer(output_path)
