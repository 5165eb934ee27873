"""SentencePiece tokenizer with Llama 2's conventions, and training one from a corpus.

Meta's `llama/tokenizer.py` semantics: ids are `sp.encode(text)`, with BOS (1) prepended and
EOS (2) appended when asked; UNK is 0 and there is no pad id. `Tokenizer` loads Meta's
`tokenizer.model` as it is. `train_tokenizer` trains a BPE model with byte fallback and
Llama's settings (digits split, whitespace kept as is, no normalization), for pretraining
from scratch, the demo and tests.
"""

from __future__ import annotations

import functools
import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from llamax import fs

UNK, BOS, EOS = 0, 1, 2
# The most characters encoded in one call of `encode_pieces` (where the text allows a cut):
# SentencePiece needs about 50 bytes per character of a call, and returns a Python list.
PIECE_CHARS = 1 << 16


class NotUnicode(ValueError):
    """Text that sentencepiece cannot encode: it is not valid Unicode (a lone surrogate at
    character `position`; `detail` says so without the preamble)."""

    def __init__(self, text: str, position: int):
        self.position = position
        self.detail = f"a lone surrogate {text[position]!r} at character {position}"
        super().__init__(f"text that is not valid Unicode: {self.detail}")


def lone_surrogate(text: str) -> int | None:
    """The index of the first character of `text` that UTF-8 cannot encode (a lone surrogate
    half, which JSON's `"\\ud800"` or a file name's undecodable byte can make), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


class Tokenizer:
    def __init__(self, model_path: str):
        model_path = fs.expand(model_path)
        try:
            fs.require_file(model_path, "the tokenizer model ")
        except FileNotFoundError:
            raise FileNotFoundError(f"Tokenizer model not found: {model_path}") from None
        self.path = model_path
        try:
            proto = fs.read_bytes(model_path)
            if not proto:  # sentencepiece loads an empty proto as a model of no pieces
                raise ValueError("the file is empty")
            self.sp = spm.SentencePieceProcessor(model_proto=proto)
        except (RuntimeError, OSError, ValueError) as e:  # sentencepiece's parse errors
            raise ValueError(
                f"{model_path}: not a sentencepiece model (empty, truncated or another "
                f"format): {str(e)[:200]}"
            ) from e
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.unk_id, self.pad_id = self.sp.unk_id(), self.sp.pad_id()
        if self.vocab_size <= 0 or self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(
                f"{model_path}: a sentencepiece model without Llama's BOS and EOS pieces "
                f"(vocabulary {self.vocab_size}, BOS {self.bos_id}, EOS {self.eos_id})"
            )
        self._cuttable, self._dummy_prefix = _cut_settings(self.sp)

    def _encode(self, text: str) -> list[int]:
        try:
            return self.sp.encode(text)
        except RuntimeError:  # pybind's "Unable to cast" of a str UTF-8 cannot encode
            at = lone_surrogate(text) if isinstance(text, str) else None
            if at is None:
                raise
            raise NotUnicode(text, at) from None

    @functools.cached_property
    def max_piece_bytes(self) -> int:
        """The most bytes of UTF-8 text one token stands for: the longest piece's (`▁` the
        one space it stands for, a byte piece one byte, an unknown piece a character: up to
        4), what bounds the tokens of a text from below (`records.max_record_bytes`)."""
        sp, longest = self.sp, 4
        for i in range(self.vocab_size):
            if not (sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i) or sp.is_unused(i)):
                longest = max(longest, len(sp.id_to_piece(i).replace("\u2581", " ").encode()))
        return longest

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Meta's `Tokenizer.encode(s, bos, eos)`; `NotUnicode` (a ValueError) for text that
        is not valid Unicode."""
        ids = self._encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_array(self, text: str, bos: bool = True, eos: bool = True) -> np.ndarray:
        return np.asarray(self.encode(text, bos, eos), dtype=np.int32)

    def encode_pieces(
        self, text: str, bos: bool = True, eos: bool = True, max_chars: int | None = None
    ) -> Iterator[np.ndarray]:
        """`encode_array(text, bos, eos)` as consecutive int32 arrays, encoding about
        `max_chars` characters at a time, so that a document of any length is tokenized in
        bounded memory. The text is cut only at a space between two other characters: with
        SentencePiece's whitespace pre-splitting, the `▁` it becomes always begins a piece,
        so the pieces' ids concatenate to the whole text's (tests/test_tokenizer.py). A text
        with no such space in a window is encoded in a longer piece; a model whose settings
        do not give that guarantee encodes each text whole."""
        if bos:
            yield np.asarray([self.bos_id], np.int32)
        for start, end in self._cuts(text, max_chars or PIECE_CHARS):
            # After a cut the piece starts with the space; the dummy prefix `▁` stands for it.
            piece = text[start + 1 : end] if start and self._dummy_prefix else text[start:end]
            yield np.asarray(self._encode(piece), np.int32)
        if eos:
            yield np.asarray([self.eos_id], np.int32)

    def _cuts(self, text: str, max_chars: int) -> Iterator[tuple[int, int]]:
        n, start = len(text), 0
        while start < n:
            end = n if not self._cuttable or n - start <= max_chars else None
            limit = start + max_chars
            while end is None:
                c = text.rfind(" ", start + 1, limit + 1)
                if c == -1:  # no space in the window: the first cut after it, if any
                    c = text.find(" ", limit + 1)
                    while c != -1 and not _cut_at(text, c):
                        c = text.find(" ", c + 1)
                    end = n if c == -1 else c
                elif _cut_at(text, c):
                    end = c
                else:
                    limit = c - 1
            yield start, end
            start = end

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


def _cut_at(text: str, c: int) -> bool:
    """A space at `c` with another character on each side."""
    return 0 < c < len(text) - 1 and text[c - 1] != " " and text[c + 1] != " "


def _cut_settings(sp: spm.SentencePieceProcessor) -> tuple[bool, bool]:
    """(whether texts may be cut at spaces, whether the model adds a dummy-prefix `▁`): cuts
    need no normalization (which could join characters across the cut) and whitespace
    pre-splitting with `▁` as a piece prefix (Llama's tokenizer, and `train_tokenizer`'s)."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(sp.serialized_model_proto())
    normalizer, trainer = model.normalizer_spec, model.trainer_spec
    cuttable = (
        normalizer.name == "identity"
        and normalizer.escape_whitespaces
        and trainer.split_by_whitespace
        and not trainer.treat_whitespace_as_suffix
    )
    return cuttable, normalizer.add_dummy_prefix


def train_tokenizer(
    texts: Iterable[str],
    output_path: str,
    vocab_size: int,
    max_sentence_length: int = 1 << 16,
    input_sentence_size: int = 2_000_000,
    vocab_name: str = "vocab_size",
) -> Tokenizer:
    """Trains a BPE SentencePiece model on `texts` and writes it atomically to `output_path`.
    What sentencepiece refuses is a ValueError in llamax's terms (`vocab_name`: how the
    caller's users set the vocabulary size)."""
    model = io.BytesIO()
    try:
        _train(texts, model, vocab_size, max_sentence_length, input_sentence_size)
    except RuntimeError as e:
        raise ValueError(training_error(str(e), vocab_size, vocab_name)) from None
    fs.write_bytes(output_path, model.getvalue())
    return Tokenizer(output_path)


def training_error(message: str, vocab_size: int, vocab_name: str = "vocab_size") -> str:
    """sentencepiece's refusal to train, said in llamax's terms: what the vocabulary size
    must be and what to do (never a sentencepiece flag llamax does not have)."""
    too_high = re.search(r"Vocabulary size too high \((\d+)\)(?:.*<= (\d+))?", message)
    if too_high:
        limit = f"; it allows at most {int(too_high[2]):,}" if too_high[2] else ""
        return (f"{vocab_name} {vocab_size:,} is more pieces than the text can make{limit}: "
                f"lower {vocab_name}, or give more text")  # fmt: skip
    too_low = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
    if too_low:
        return (
            f"{vocab_name} {vocab_size:,} is too small for the text: it needs at least "
            f"{int(too_low[1]):,} pieces (the 256 bytes of byte fallback, the special pieces "
            f"and each character of the text); raise {vocab_name}"
        )
    detail = re.sub(r"^\w+: \S+\(\d+\) \[.*?\] ", "", message.strip())
    return f"sentencepiece cannot train on the text: {detail}"


def _train(texts, model, vocab_size, max_sentence_length, input_sentence_size) -> None:
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
