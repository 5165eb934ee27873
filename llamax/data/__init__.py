"""Input data, configured by the experiment config's `data` section.

Four sources, one interface: `make_iterator` returns an iterator of this process's rows of
each global batch (dicts of int32 [rows, seq_len]: `fields(c)`, which are `tokens`,
`segment_ids`, `positions`, `loss_mask` for chat and preference data, and `rating` for
preference data) with `get_state()` / `set_state()` for checkpoints.

- `tfds`: text through tensorflow-datasets (a local corpus built from `data.files`, or a
  catalog dataset `data.tfds_name`), tokenized with the sentencepiece model `data.tokenizer`,
  packed by the grain pipeline (`llamax.data.pipeline`).
- `chat`: dialogs and prompt/completion pairs for supervised fine-tuning, from jsonl files
  (`data.files`, a validation share held out by `data.validation_fraction`) or a prepared tfds
  dataset (`data.tfds_name`, its own train and validation splits), in Meta's chat format with
  a loss mask (`llamax.data.chat`).
- `preference`: pairs of responses to a prompt, the chosen and the rejected, with an optional
  rating, for reward models (`llamax.data.preference`), from files or a tfds dataset as chat.
- `prompts`: prompts for PPO's rollouts (`llamax.data.prompts`), from files or a tfds dataset
  as chat: not batches of rows but a stream of prompts (`prompt_stream`).
- `markov`: a synthetic Markov chain with a known entropy rate, for tests.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Iterator, Sequence

import jax
import ml_collections
import numpy as np

from llamax import fs
from llamax.data.markov import MarkovSource

SOURCES = ("tfds", "chat", "preference", "prompts", "markov")
log = logging.getLogger("llamax")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.source = "markov"  # one of SOURCES
    c.seed = 0  # shuffling and sampling; independent of train.seed (model initialization)
    # tfds: a catalog dataset by name ("c4/en:3.1.0"), or else a corpus built from `files`.
    c.tfds_name = ""
    c.tfds_data_dir = "~/tensorflow_datasets"  # where tfds datasets are built and read
    c.files = ""  # comma-separated glob patterns of .txt/.jsonl(.gz) files (`**` recurses)
    c.text_field = "text"  # the JSON field holding a document (and the tfds feature name)
    c.validation_fraction = 0.05  # share of local documents held out for the eval loss
    c.tokenizer = ""  # path of a sentencepiece model (Meta's tokenizer.model, or trained)
    c.add_bos = True  # a BOS before each document, as Llama 2 was trained
    c.add_eos = True  # an EOS after each document
    # chat: which tokens are trained on ("answers": assistant turns and completions with their
    # EOS; "everything"), and what becomes of an example longer than train.seq_len ("drop",
    # or "truncate": its first seq_len tokens).
    c.chat_train_on = "answers"
    c.chat_too_long = "drop"
    # preference: how many pairs (chosen + rejected, two segments) may share a row.
    c.pairs_per_row = 1
    # markov: a random chain over `markov_states` symbols, Dirichlet(`markov_alpha`) rows.
    c.markov_states = 32
    c.markov_alpha = 0.3
    return c


def check(c: ml_collections.ConfigDict) -> None:
    """Clear errors for data settings no run could use."""
    errors = []
    if c.source not in SOURCES:
        errors.append(f"data.source must be one of {SOURCES}, got {c.source!r}")
    if not (isinstance(c.markov_states, int) and c.markov_states >= 2):
        errors.append(f"data.markov_states must be an integer >= 2, got {c.markov_states!r}")
    if not (isinstance(c.markov_alpha, int | float) and 0 < c.markov_alpha < float("inf")):
        errors.append(f"data.markov_alpha must be positive, got {c.markov_alpha!r}")
    if fs.is_remote(c.tfds_data_dir):
        errors.append(_REMOTE_DATA_DIR.format(c.tfds_data_dir))
    from llamax.data import chat

    if c.chat_train_on not in chat.TRAIN_ON:
        errors.append(f"data.chat_train_on must be one of {chat.TRAIN_ON}, got {c.chat_train_on!r}")
    if c.chat_too_long not in chat.TOO_LONG:
        errors.append(f"data.chat_too_long must be one of {chat.TOO_LONG}, got {c.chat_too_long!r}")
    if c.source in ("chat", "preference", "prompts") and bool(c.files) == bool(c.tfds_name):
        errors.append(
            f"data.source {c.source!r} needs data.files (jsonl files of records) or "
            f"data.tfds_name (a prepared tfds dataset), one of the two; got files {c.files!r} "
            f"and tfds_name {c.tfds_name!r}"
        )
    if not (isinstance(c.pairs_per_row, int) and c.pairs_per_row >= 1):
        errors.append(f"data.pairs_per_row must be an integer >= 1, got {c.pairs_per_row!r}")
    fraction = c.validation_fraction
    if not (isinstance(fraction, int | float) and 0 <= fraction < 1):
        errors.append(f"data.validation_fraction must be in [0, 1), got {fraction!r}")
    if errors:
        raise ValueError("Invalid data config: " + "; ".join(errors))


def vocab_size(c: ml_collections.ConfigDict) -> int:
    """The number of ids the data can produce (the model's vocab_size must be at least this)."""
    check(c)
    if c.source == "markov":
        return c.markov_states
    if c.source in ("tfds", "chat", "preference", "prompts"):
        from llamax.data.tokenizer import Tokenizer

        if not c.tokenizer:
            raise ValueError(
                f"data.source {c.source!r} needs data.tokenizer (a sentencepiece model)"
            )
        return Tokenizer(c.tokenizer).vocab_size
    raise ValueError(f"Unknown data.source {c.source!r}; expected one of {SOURCES}")


def fields(c: ml_collections.ConfigDict) -> tuple[str, ...]:
    """What each batch of this data holds (every field int32 [rows, seq_len])."""
    base = ("tokens", "segment_ids", "positions")
    if c.source == "preference":
        from llamax.data.preference import FIELDS

        return (*base, "loss_mask", *FIELDS)
    return (*base, "loss_mask") if c.source == "chat" else base


class _StatelessIterator:
    """Steps through a stateless source; the state is the next step."""

    def __init__(self, source, rows: Sequence[int], seq_len: int):
        self.source, self.rows, self.seq_len, self.step = source, rows, seq_len, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.source.rows(self.step, self.rows, self.seq_len)
        self.step += 1
        return batch

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])


_REMOTE_DATA_DIR = (
    "data.tfds_data_dir {} is not a local directory: tfds datasets are read as ArrayRecord "
    "files, whose reader opens local files only. Give a local directory (corpus files on "
    "gs:// are read from there and built into it), or mount the bucket with gcsfuse and "
    "give the mount point"
)


def local_data_dir(path: str) -> str:
    """A tfds data directory, `~` expanded; a clear error for a URL."""
    if fs.is_remote(path):
        raise ValueError(_REMOTE_DATA_DIR.format(path))
    return os.path.expanduser(path)


def _one_text_source(files: str, tfds_name: str) -> None:
    if bool(files) == bool(tfds_name):
        raise ValueError(
            "Give the text as local files or as a prepared tfds dataset, one of the two: got "
            f"files {files!r} and tfds dataset {tfds_name!r} (set the other to '')"
        )


def tfds_builder(c: ml_collections.ConfigDict):
    """The tfds builder of the configured dataset; a local corpus is built on first use (by
    process 0 first, so that processes sharing a data dir do not build it twice)."""
    from llamax.data import corpus

    _one_text_source(c.files, c.tfds_name)
    data_dir = local_data_dir(c.tfds_data_dir)
    if c.tfds_name:
        return corpus.catalog_builder(c.tfds_name, data_dir)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if jax.process_index() == 0:
            corpus.build_corpus(c.files, data_dir, c.text_field, c.validation_fraction)
        multihost_utils.sync_global_devices("llamax: corpus built")
    return corpus.build_corpus(c.files, data_dir, c.text_field, c.validation_fraction)


def _records(c: ml_collections.ConfigDict, split: str, seq_len: int, accepted=None) -> Sequence:
    """A split of the records of `chat` or `preference` data: a prepared tfds dataset's split,
    or the train or held-out share of the jsonl files' lines (those too long for a row of
    `seq_len` tokens are never read: `records.max_record_bytes`). Logs what it holds."""
    from llamax.data import records as records_lib
    from llamax.data.tokenizer import Tokenizer

    vocab_size(c)  # checks the tokenizer exists
    name = f"data: {c.source} {split} split"
    if not c.tfds_name:
        max_bytes = records_lib.max_record_bytes(seq_len, Tokenizer(fs.expand(c.tokenizer)))
        everything = _read_records(c.files, max_bytes)
        chosen = records_lib.split(everything, split, c.validation_fraction)
        too_long = int(np.sum(everything.lengths[chosen.indices] > max_bytes))
        held = f"{len(everything) - len(chosen):,} held out" if split == "train" else "held out"
        log.info(
            "%s: %s of the %s records of %d file(s) (%s: data.validation_fraction %s)%s%s",
            name, f"{len(chosen):,}", f"{len(everything):,}", len(everything.paths), held,
            c.validation_fraction, _too_long(too_long, max_bytes), _share(len(chosen)),
        )  # fmt: skip
        return chosen
    from llamax.data import corpus

    builder = corpus.catalog_builder(c.tfds_name, local_data_dir(c.tfds_data_dir))
    source = corpus.data_source(builder, split)
    tfds_name = f"tfds dataset {c.tfds_name!r}"
    log.info("%s: %s records of %s%s", name, f"{len(source):,}", tfds_name, _share(len(source)))
    if accepted is None:
        return records_lib.TfdsRecords(source, c.text_field, tfds_name)
    return records_lib.TfdsRecords(source, c.text_field, tfds_name, accepted)


# Records indexed and still in use (a run's train split), by their files, the limit and the
# files' sizes and times: the validation split reads the same files without a second pass.
_INDEXED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _read_records(files: str, max_bytes: int):
    """`records.read_records`, or the records of the same files already indexed and in use."""
    from llamax.data import records as records_lib

    key = (files, max_bytes, tuple((p, fs.stat_key(p)) for p in records_lib.expand_patterns(files)))
    records = _INDEXED.get(key)
    if records is None:
        records = _INDEXED[key] = records_lib.read_records(files, max_bytes)
    return records


def _too_long(count: int, max_bytes: int) -> str:
    if not count:
        return ""
    return f"; {count:,} of them lines over {max_bytes:,} bytes, too long for a row: skipped unread"


def _share(count: int) -> str:
    """This process's share of `count` records, when there are several processes."""
    index, processes = jax.process_index(), jax.process_count()
    if processes == 1:
        return ""
    return f"; process {index} of {processes} reads {len(range(index, count, processes)):,}"


def make_iterator(c: ml_collections.ConfigDict, split: str, seq_len: int, rows: Sequence[int]):
    """This process's rows of each global batch; `rows` are their indices in the global batch
    (stateless sources use them; the grain pipeline only needs how many)."""
    if c.source == "markov":
        return _StatelessIterator(
            MarkovSource(c.markov_states, c.markov_alpha, c.seed, split), rows, seq_len
        )
    seed = c.seed + (0 if split == "train" else 1)
    shard = (jax.process_index(), jax.process_count())
    if c.source == "chat":
        from llamax.data import chat

        dataset = chat.make_dataset(
            _records(c, split, seq_len), fs.expand(c.tokenizer), seq_len, len(rows), seed, shard,
            train_on=c.chat_train_on, too_long=c.chat_too_long, name=f"data: chat {split} split",
        )  # fmt: skip
        return iter(dataset)
    if c.source == "preference":
        from llamax.data import preference

        dataset = preference.make_dataset(
            _records(c, split, seq_len, ({"prompt", "chosen", "rejected"},)),
            fs.expand(c.tokenizer), seq_len, len(rows), seed, shard,
            pairs_per_row=c.pairs_per_row, name=f"data: preference {split} split",
        )  # fmt: skip
        return iter(dataset)
    if c.source == "prompts":
        raise ValueError("data.source 'prompts' gives prompts for PPO's rollouts, not batches "
                         "of rows: train it with task 'ppo'")  # fmt: skip
    if c.source != "tfds":
        raise ValueError(f"Unknown data.source {c.source!r}; expected one of {SOURCES}")
    from llamax.data import corpus, pipeline

    vocab_size(c)  # checks the tokenizer exists
    source = corpus.data_source(tfds_builder(c), split)
    dataset = pipeline.make_dataset(
        source,
        fs.expand(c.tokenizer),
        seq_len,
        len(rows),
        seed=seed,
        process_index=shard[0],
        process_count=shard[1],
        text_field=c.text_field,
        add_bos=c.add_bos,
        add_eos=c.add_eos,
    )
    return iter(dataset)


def prompt_stream(c: ml_collections.ConfigDict, split: str, max_tokens: int):
    """The prompts of `split` ("train", "validation") of `prompts` data, at most `max_tokens`
    tokens each (`llamax.data.prompts.PromptStream`); the same on every process."""
    from llamax.data import prompts
    from llamax.data.tokenizer import Tokenizer

    if c.source != "prompts":
        raise ValueError(f"data.source must be 'prompts' for a prompt stream, got {c.source!r}")
    records = _records(c, split, max_tokens, ({"prompt"},))
    seed = c.seed + (0 if split == "train" else 1)
    return prompts.PromptStream(records, Tokenizer(fs.expand(c.tokenizer)), max_tokens, seed,
                                name=f"data: prompts {split} split")  # fmt: skip


def documents(
    files: str = "",
    tfds_name: str = "",
    tfds_data_dir: str = "",
    split: str = "validation",
    text_field: str = "text",
) -> Iterator[str]:
    """Documents to evaluate on: every good document of text files (comma-separated globs of
    .txt/.jsonl(.gz); bad ones are skipped as in a corpus), or a split of a prepared tfds
    dataset."""
    from llamax.data import corpus

    _one_text_source(files, tfds_name)
    if files:
        for path in corpus.expand_patterns(files):
            for _, text, problem in corpus.read_documents(path, text_field):
                if problem is None:
                    yield text
        return
    builder = corpus.catalog_builder(tfds_name, local_data_dir(tfds_data_dir) or None)
    source = corpus.data_source(builder, split)
    for i in range(len(source)):
        yield corpus.record_text(source[i], text_field)
