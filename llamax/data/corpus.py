"""Text corpora as tensorflow-datasets, stored as ArrayRecord and read back at random access.

`TextCorpus` is a tfds `GeneratorBasedBuilder` over local files: `.txt` (one document per
file), `.jsonl` (one document per line, from a text field), either optionally gzipped; files
or glob patterns. Each document goes to the train or the validation split by a hash of its
location, so the split is stable as files come and go. A catalog dataset (say `c4/en` in a
`gs://` data dir) is read through the same path by name, once prepared as ArrayRecord.
TensorFlow is not needed.

Bad input never becomes a silent wrong batch: a missing pattern is an error; empty documents,
bytes that are not UTF-8, text that is not valid Unicode (a lone surrogate escaped in JSON),
lines that are not JSON or lack the text field, and files that cannot be read to the end (a
truncated or corrupt `.gz`, a `.gz` that is not gzip, an unreadable file) are skipped, counted,
and logged with the first place each happened; the documents read before a file broke off
are kept.
"""

from __future__ import annotations

import collections
import contextlib
import gzip
import hashlib
import io
import json
import logging
import random
import zlib
from collections.abc import Iterator, Sequence

import tensorflow_datasets as tfds

from llamax import fs
from llamax.data.records import expand_patterns

log = logging.getLogger("llamax")
SPLITS = ("train", "validation")
# Documents longer than this (characters) become several records, cut at line ends, so that
# a corpus of one large file can hold some of it out for validation.
PART_CHARS = 1 << 16


class TextCorpusConfig(tfds.core.BuilderConfig):
    def __init__(self, *, files: Sequence[str], text_field: str, validation_fraction: float, **kw):
        super().__init__(**kw)
        self.files, self.text_field = list(files), text_field
        self.validation_fraction = validation_fraction


class TextCorpus(tfds.core.GeneratorBasedBuilder):
    """Local text files as a tfds dataset with `train` and `validation` splits of {"text"}."""

    VERSION = tfds.core.Version("1.1.0")  # 1.1: long documents in parts; a held-out record
    BUILDER_CONFIGS: list[TextCorpusConfig] = []

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local text corpus: " + ", ".join(self.builder_config.files[:5]),
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        )

    def _split_generators(self, dl_manager):
        fraction = self.builder_config.validation_fraction
        held_out = self._held_out() if fraction > 0 else set()
        splits = SPLITS if fraction > 0 else ("train",)
        return {split: self._generate_examples(split, held_out) for split in splits}

    def _records(self) -> Iterator[tuple[str, str | None, str | None]]:
        """(key, text, problem) of every record: documents, long ones in parts."""
        for path in self.builder_config.files:
            for key, text, problem in read_documents(path, self.builder_config.text_field):
                if problem is not None or len(text) <= PART_CHARS:
                    yield key, text, problem
                    continue
                for i, part in enumerate(split_text(text, PART_CHARS)):
                    yield f"{key}#part{i}", part, None

    def _held_out(self) -> set[str]:
        """The validation records: those whose key hashes under the fraction (stable as files
        come and go), and at least one record each way when there are two or more."""
        scores = {key: zlib.crc32(key.encode()) % 10_000 for key, _, p in self._records()
                  if p is None}  # fmt: skip
        threshold = self.builder_config.validation_fraction * 10_000
        held = {key for key, score in scores.items() if score < threshold}
        if len(scores) >= 2 and not held:
            held = {min(scores, key=scores.get)}
        if len(scores) >= 2 and held == set(scores):
            held.discard(max(scores, key=scores.get))
        return held

    def _generate_examples(self, split: str, held_out: set[str]) -> Iterator[tuple[str, dict]]:
        skipped: dict[str, list] = collections.defaultdict(list)
        kept = 0
        for key, text, problem in self._records():
            if problem is not None:
                skipped[problem].append(key)
            elif (key in held_out) == (split == "validation"):
                kept += 1
                yield key, {"text": text}
        for problem, keys in skipped.items():
            log.warning(
                "corpus %s split: skipped %d %s (first: %s)", split, len(keys), problem, keys[0]
            )
        log.info("corpus %s split: %d records", split, kept)


def split_text(text: str, size: int) -> list[str]:
    """`text` in consecutive parts of at most about `size` characters, cut after a line end
    where there is one in the window, else after a space, else anywhere."""
    parts, start = [], 0
    while len(text) - start > size:
        window = text[start : start + size]
        cut = window.rfind("\n") + 1 or window.rfind(" ") + 1 or size
        parts.append(text[start : start + cut])
        start += cut
    return [*parts, text[start:]]


@contextlib.contextmanager
def _open(path: str) -> Iterator:
    with fs.open(path, "rb") as raw:
        yield gzip.GzipFile(fileobj=raw, mode="rb") if path.endswith(".gz") else raw


def _valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, which JSON's \ud800 escapes can make
        return False
    return True


def chat_texts(record: dict) -> list[str] | None:
    """The texts of a chat record (`messages`), a prompt/completion pair or a preference pair
    (`prompt`, `chosen`, `rejected`; a prompt may be messages), what a tokenizer for such
    data should see; None for a record of another kind."""
    if isinstance(record.get("messages"), list):
        parts = [m.get("content") for m in record["messages"] if isinstance(m, dict)]
    elif "prompt" in record and any(k in record for k in ("completion", "chosen", "rejected")):
        prompt = record["prompt"]
        if isinstance(prompt, list):
            parts = [m.get("content") for m in prompt if isinstance(m, dict)]
        else:
            parts = [prompt]
        parts += [record.get(k) for k in ("completion", "chosen", "rejected")]
    else:
        return None
    return [t for t in parts if isinstance(t, str) and t]


def read_documents(path: str, text_field: str, chat: bool = False):
    """(key, text, problem) for each document of a file; problem is None for a good one. With
    `chat`, a jsonl record without the text field that is a chat record gives its texts
    (`chat_texts`), one a line."""
    key = path
    try:
        for key, text, problem in _documents(path, text_field, chat):
            yield key, text, problem
    except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        problem = "truncated or corrupt files" if not isinstance(e, gzip.BadGzipFile) else (
            "files named .gz that are not gzip"
        )  # fmt: skip
        where = path if key == path else f"{path} after {key}"
        yield f"{where} ({type(e).__name__})", None, problem


def _documents(path: str, text_field: str, chat: bool = False):
    """(key, text, problem) for each document of a file; raises if the file breaks off."""
    base = path[:-3] if path.endswith(".gz") else path
    if base.endswith(".jsonl") or base.endswith(".json"):
        with _open(path) as f:
            for i, raw in enumerate(f):
                key = f"{path}:{i + 1}"
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    yield key, None, "records that are not UTF-8"
                    continue
                except (json.JSONDecodeError, RecursionError):
                    yield key, None, "lines that are not JSON"
                    continue
                text = record.get(text_field) if isinstance(record, dict) else None
                if chat and text is None and isinstance(record, dict):
                    texts = chat_texts(record)
                    text = text if texts is None else "\n".join(texts)
                if not isinstance(text, str):
                    kinds = " or the texts of a chat record" if chat else ""
                    yield key, None, f"records without a string {text_field!r} field{kinds}"
                elif not text:
                    yield key, None, "empty documents"
                elif not _valid_unicode(text):
                    yield key, None, "records that are not valid Unicode"
                else:
                    yield key, text, None
        return
    with _open(path) as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        yield f"{path} (byte {e.start})", None, "files that are not UTF-8"
        return
    yield path, text, None if text else "empty documents"


def sample_lines(
    patterns: str | Sequence[str],
    text_field: str,
    max_lines: int,
    seed: int = 0,
    chat: bool = False,
) -> list[str]:
    """At most `max_lines` non-empty lines drawn uniformly (reservoir sampling, seeded) from
    every good document of the files (with `chat`, chat records' texts too: `chat_texts`):
    what a tokenizer trains on, from the whole corpus rather than its alphabetically first
    files. Logs how many lines of how many documents it read, and what it skipped."""
    rng, sample, seen, documents = random.Random(seed), [], 0, 0
    skipped: dict[str, list] = collections.defaultdict(list)
    files = expand_patterns(patterns)
    for path in files:
        for key, text, problem in read_documents(path, text_field, chat):
            if problem is not None:
                skipped[problem].append(key)
                continue
            documents += 1
            for line in text.splitlines():
                if not line.strip():
                    continue
                seen += 1
                if len(sample) < max_lines:
                    sample.append(line)
                elif (slot := rng.randrange(seen)) < max_lines:
                    sample[slot] = line
    for problem, keys in skipped.items():
        log.warning("skipped %d %s (first: %s)", len(keys), problem, keys[0])
    log.info("read %d lines of %d documents of %d file(s); sampled %d (seed %d)", seen,
             documents, len(files), len(sample), seed)  # fmt: skip
    if not sample:
        why = "; ".join(f"{len(k)} {problem} (first: {k[0]})" for problem, k in skipped.items())
        raise ValueError(
            f"No text in {patterns!r}: every document is empty or unreadable"
            + (f" ({why})" if why else "")
        )
    return sample


def build_corpus(
    patterns: str | Sequence[str],
    data_dir: str,
    text_field: str = "text",
    validation_fraction: float = 0.05,
) -> TextCorpus:
    """Prepares (once) and returns the tfds builder for these files.

    The builder's config name is a hash of the files (paths, sizes, modification times) and
    the settings, so a changed corpus is rebuilt rather than read stale."""
    files = expand_patterns(patterns)
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{fs.absolute(path)}|{fs.stat_key(path)}\n".encode())
    digest.update(f"{text_field}|{validation_fraction}".encode())
    config = TextCorpusConfig(
        name=f"corpus_{digest.hexdigest()[:12]}",
        files=files,
        text_field=text_field,
        validation_fraction=validation_fraction,
    )
    builder = TextCorpus(config=config, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        log.info("building tfds corpus of %d files into %s", len(files), builder.data_dir)
        try:
            # tfds announces a download ("Downloading and preparing dataset Unknown size")
            # on stdout and draws bars for a local corpus: llamax's log line says it.
            tfds.disable_progress_bar()
            with contextlib.redirect_stdout(io.StringIO()):
                builder.download_and_prepare()
        except AssertionError as e:  # tfds refuses to write an empty split
            if "No examples were yielded" not in str(e):
                raise
            held_out = (
                f"; with data.validation_fraction {validation_fraction} each split needs one: "
                "set data.validation_fraction=0 (and train.eval_every=0, no held-out loss) to "
                "train on all of them" if validation_fraction > 0 else ""
            )  # fmt: skip
            raise ValueError(
                f"the corpus {patterns!r} has no usable documents for one of its splits (see "
                f"the warnings above): add documents{held_out}"
            ) from e
    return builder


def record_text(record: dict, text_field: str) -> str:
    """The document of a tfds record (stored as UTF-8 bytes)."""
    text = record[text_field]
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)


def data_source(builder: tfds.core.DatasetBuilder, split: str):
    """Random-access ArrayRecord source of one split; records are {"text": bytes}."""
    splits = sorted(builder.info.splits.keys())
    if split not in splits:
        hint = (
            " (a local corpus has one when data.validation_fraction > 0)"
            if isinstance(builder, TextCorpus) else ""
        )  # fmt: skip
        raise ValueError(
            f"{builder.name} in {builder.data_dir} has no {split!r} split{hint}; it has "
            f"{splits}. An eval needs one: set it up, or train.eval_every=0 for no eval."
        )
    try:
        source = builder.as_data_source(split=split)
    except Exception as e:  # tfds raises several types for a missing split or format
        raise ValueError(
            f"Cannot read split {split!r} of {builder.name} in {builder.data_dir} as ArrayRecord "
            f"({e}). Catalog datasets must be prepared with file_format=array_record."
        ) from e
    if len(source) == 0:
        fix = (" the run evaluates on it (train.eval_every > 0): set train.eval_every=0 to "
               "train without a held-out loss, or" if split == "validation" else "")  # fmt: skip
        raise ValueError(
            f"The {split!r} split of {builder.name} has no documents:{fix} add documents to it"
        )
    return source


def catalog_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """A prepared catalog dataset, e.g. `c4/en:3.1.0` in `gs://bucket/tensorflow_datasets`."""
    builder = tfds.builder(name, data_dir=data_dir or None)
    if not builder.is_prepared():
        raise ValueError(
            f"tfds dataset {name!r} is not prepared in {builder.data_dir}: prepare it first "
            "(tfds build --file_format=array_record), or point data.tfds_data_dir at it"
        )
    return builder
