"""The sentencepiece tokenizer: Meta's semantics, round trips, and transformers' differences."""

import ast

import numpy as np
import pytest
import sentencepiece as spm

from llamax.data.tokenizer import Tokenizer

TEXTS = [
    "the model trains on packed documents",
    "naïve café — größe über straße 東京",
    "  leading spaces and   runs of   spaces",
    "tabs\tand\nnewlines\n\nand a trailing newline\n",
    "bytes never seen: 🦙 ☃ \x07 ǅ ﷺ",
    "",
    "1234567890 digits split",
]


def test_meta_reference_semantics(tokenizer_path):
    """Meta's `Tokenizer.encode(s, bos, eos)`: sp.encode, then BOS/EOS around it."""
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    tok = Tokenizer(tokenizer_path)
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)
    for text in TEXTS:
        ids = sp.encode(text)
        assert tok.encode(text, bos=True, eos=True) == [1, *ids, 2]
        assert tok.encode(text, bos=False, eos=False) == ids
        assert tok.encode_array(text).dtype == np.int32


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer_path, text):
    tok = Tokenizer(tokenizer_path)
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


def test_unseen_bytes_use_byte_fallback(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    pieces = [tok.sp.id_to_piece(i) for i in tok.encode("🦙", bos=False)]
    assert "<0xF0>" in pieces  # the llama's first UTF-8 byte, not UNK
    assert tok.unk_id not in tok.encode("🦙 ☃ \x07", bos=False)


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="Tokenizer model not found"):
        Tokenizer(str(tmp_path / "nope.model"))
    with pytest.raises(ValueError, match="/dev/zero is a character device, not a regular"):
        Tokenizer("/dev/zero")  # not "not found", and never read (it would never end)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        Tokenizer(str(tmp_path))


def test_transformers_llama_tokenizer_differences(tokenizer_path, tmp_path):
    """transformers 5's `LlamaTokenizer` converts the sentencepiece model to a `tokenizers` BPE
    backend. It agrees on ordinary text and differs where docs/data.md says: text that starts
    with spaces (it folds sentencepiece's dummy-prefix space into the first space), and it adds
    no BOS for a bare tokenizer.model. llamax uses sentencepiece itself, as Meta does."""
    import shutil

    from transformers import LlamaTokenizer

    shutil.copy(tokenizer_path, tmp_path / "tokenizer.model")
    hf = LlamaTokenizer.from_pretrained(str(tmp_path))
    tok = Tokenizer(tokenizer_path)
    differs = [
        text
        for text in TEXTS
        if hf(text, add_special_tokens=False)["input_ids"] != tok.encode(text, bos=False)
    ]
    print("transformers differs on:", differs)
    assert differs == ["  leading spaces and   runs of   spaces"]


def test_tokenizer_cli(text_corpus, tmp_path, capsys):
    from llamax.cli import tokenizer as cli

    directory, _ = text_corpus
    out = str(tmp_path / "cli.model")
    cli.main(["train", "--input", f"{directory}/*.txt,{directory}/*.jsonl", "--vocab-size", "400",
              "--output", out])  # fmt: skip
    assert Tokenizer(out).vocab_size == 400
    cli.main(["encode", "--model", out, "the model"])
    ids = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])
    assert ids[0] == 1 and ids[-1] == 2 and Tokenizer(out).decode(ids) == "the model"


@pytest.mark.parametrize("max_chars", [1, 3, 16])
def test_pieces_concatenate_to_the_whole_texts_ids(tokenizer_path, max_chars):
    """`encode_pieces` cuts only where sentencepiece's own whole-text encoding has a piece
    boundary: across spaces, runs of spaces, tabs, newlines, digits and multi-byte text."""
    tok = Tokenizer(tokenizer_path)
    rng = np.random.default_rng(max_chars)
    alphabet = ["a", "bc", "def", " ", "  ", "   ", "\t", "\n", "é", "東京", "12", " x", "😀"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet, rng.integers(0, 60)))
        whole = tok.encode_array(text, bos=True, eos=True)
        pieces = list(tok.encode_pieces(text, bos=True, eos=True, max_chars=max_chars))
        np.testing.assert_array_equal(np.concatenate(pieces), whole, err_msg=repr(text))
    assert len(pieces) > 2 or not text


def test_text_that_is_not_valid_unicode_is_a_clear_error(tokenizer_path):
    """A lone surrogate (JSON's "\\ud800", an undecodable byte of a command line): a
    ValueError saying so and where, never sentencepiece's "Unable to cast"."""
    tok = Tokenizer(tokenizer_path)
    for call in (tok.encode, tok.encode_array, lambda t: list(tok.encode_pieces(t))):
        with pytest.raises(ValueError, match=r"not valid Unicode: a lone surrogate '\\ud800' "
                                             r"at character 4"):  # fmt: skip
            call("abc \ud800 def")


def _chat_file(path, n=40):
    import json

    rng = np.random.default_rng(0)
    words = "the model trains on packed documents with rotary positions".split()
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(rng.choice(words, 6))
            record = [
                {
                    "messages": [
                        {"role": "user", "content": f"q{i} {text}"},
                        {"role": "assistant", "content": f"a{i} {text}"},
                    ]
                },
                {"prompt": f"p{i} {text}", "completion": f" c{i}"},
                {"prompt": f"p{i}", "chosen": f"yes {text}", "rejected": "no"},
            ][i % 3]
            f.write(json.dumps(record) + "\n")  # fmt: skip


def test_tokenizer_cli_trains_on_chat_jsonl_and_says_what_it_read(tmp_path, caplog):
    """Chat, prompt/completion and preference records (no `text` field) give their texts; the
    command says how many lines of how many documents it read."""
    from llamax.cli import tokenizer as cli

    _chat_file(tmp_path / "chat.jsonl")
    out = str(tmp_path / "chat.model")
    with caplog.at_level("INFO", logger="llamax"):
        assert cli.main(["train", "--input", str(tmp_path / "chat.jsonl"), "--vocab-size", "300",
                         "--output", out]) == 0  # fmt: skip
    assert "read 93 lines of 40 documents of 1 file(s)" in caplog.text
    tok = Tokenizer(out)
    assert tok.vocab_size == 300 and tok.decode(tok.encode("q7 a7 p7 c7")) == "q7 a7 p7 c7"


@pytest.mark.parametrize(
    "vocab, message",
    [(2000, r"--vocab-size 2,000 is more pieces than the text can make; it allows at most "
            r"\d+: lower --vocab-size, or give more text"),
     (100, r"--vocab-size 100 is too small for the text: it needs at least \d+ pieces .*raise "
           r"--vocab-size"),
     (0, r"--vocab-size must be a positive number of pieces, got 0")],
)  # fmt: skip
def test_tokenizer_cli_says_what_vocabulary_would_do(vocab, message, tmp_path, capsys):
    """sentencepiece's refusals in llamax's terms: the size that would do and the flag to
    change, never sentencepiece's own flags (`--character_coverage`) or its source lines."""
    import re

    from llamax.cli import tokenizer as cli

    _chat_file(tmp_path / "chat.jsonl")
    out = tmp_path / "chat.model"
    assert cli.main(["train", "--input", str(tmp_path / "chat.jsonl"), "--vocab-size",
                     str(vocab), "--output", str(out)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert re.search(r"llamax-tokenizer: error: " + message, err), err
    assert "character_coverage" not in err and ".cc" not in err and not out.exists()


def test_no_token_stands_for_more_text_than_the_longest_piece(tokenizer_path):
    """What bounds the tokens of a line from below (`records.max_record_bytes`): a text of B
    bytes of UTF-8 has at least B / max_piece_bytes tokens."""
    tok = Tokenizer(tokenizer_path)
    longest = tok.max_piece_bytes
    assert 4 <= longest < 40
    rng = np.random.default_rng(0)
    pieces = [
        tok.sp.id_to_piece(i).replace("\u2581", " ")
        for i in range(tok.vocab_size)
        if not (tok.sp.is_control(i) or tok.sp.is_byte(i) or tok.sp.is_unknown(i))
    ]
    for text in [*TEXTS, "".join(rng.choice(pieces, 500)), " " * 1000, "a" * 1000]:
        assert len(text.encode()) <= longest * len(tok.encode(text, bos=False)), text
