"""Ghost Attention (GAtt; Llama 2, Touvron et al. 2023, section 3.3): training dialogs that
teach a chat model to keep a system instruction for a whole conversation, not only its first
turns.

    llamax-gatt --checkpoint runs/rlhf --dialogs dialogs.jsonl --output gatt.jsonl \
        [--instructions families.json] [--shorten 0.5] [--turns every|last]

The recipe, as the paper gives it:

- an instruction (`Instruction`) per dialog: the one its record names (`"instruction"`), or a
  synthetic one (`draw_instruction`): one to all of the instruction families (hobbies,
  languages, public figures by default, `FAMILIES`; a JSON file of one's own with
  `read_families`), each with a value drawn at random, combined;
- the dialog's answers sampled from the latest model with the instruction concatenated to
  every user message (`with_instruction`), turn by turn (`converse`: each turn's prompts
  batched on the inference engine, every answer conditioned on the answers before it);
- the training records (`records_of`): the instruction only in the first turn, as the system
  prompt (shortened half of the time, `shorten`: "Always act as Napoleon." -> "Figure:
  Napoleon"), the other user turns as they were, and the loss 0 on every turn but the last
  (each earlier answer carries `"weight": 0`, `llamax.data.chat_format`). With
  `turns="every"` (the default) each prefix of the dialog is a record, so every turn is once
  the last; `"last"` keeps the whole dialog only.

Decisions where the paper is silent, written here: the instruction is appended to a user
message after a blank line; an answer cut off by `max_new_tokens` ends the dialog at the turn
before it (a truncated answer is no target, and later turns would be conditioned on it), as
does a turn whose prompt and `max_new_tokens` no longer fit the model's window; a dialog
record that has its own system prompt is refused (GAtt's instruction is the system
prompt). Turn t of dialog i samples from the random stream `i * MAX_TURNS + t` of the seed,
so a dialog's answers do not depend on the batch or on the other dialogs.

Evaluation (the paper's Appendix A.3.5: the share of turns, up to 20, that still follow the
system instruction) needs a judge of "follows", which is the task's: `bench/gatt.py` measures
it on a task whose instructions can be checked exactly, with `converse` for the dialogs.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from llamax import fs, generation, loading, pretrained
from llamax.data import records as records_lib
from llamax.data.records import BadRecord, JsonlRecords
from llamax.inference import Engine, SamplingConfig

log = logging.getLogger(__name__)

MAX_TURNS = 1000  # user turns a dialog may have; the random streams are spaced by it


@dataclasses.dataclass(frozen=True)
class Family:
    """A family of instructions: its `values`, and the sentence of one value in full (`long`)
    and shortened (`short`), each with one `{}` for the value."""

    values: tuple[str, ...]
    long: str
    short: str


# The paper's three families; their values here are examples (the paper had Llama 2-Chat
# write its lists), replaceable with `read_families`.
FAMILIES = {
    "hobby": Family(("tennis", "chess", "gardening", "painting", "hiking", "cooking",
                     "astronomy", "photography"), "You enjoy {}.", "Hobby: {}"),
    "language": Family(("French", "Spanish", "German", "Italian", "Portuguese", "Japanese"),
                       "Always answer in {}.", "Language: {}"),
    "figure": Family(("Napoleon", "Marie Curie", "Shakespeare", "Cleopatra", "Einstein",
                      "Ada Lovelace"), "Always act as {}.", "Figure: {}"),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Instruction:
    """An instruction: in full, shortened (the training system prompt half of the time), and
    the value chosen of each family (empty when the record gave the instruction)."""

    long: str
    short: str
    chosen: Mapping[str, str] = dataclasses.field(default_factory=dict)


def read_families(path: str) -> dict[str, Family]:
    """Instruction families from a JSON file, `{"name": {"values": [...], "long": "... {} ...",
    "short": "... {} ..."}, ...}`; a `ValueError` naming the file and what is wrong."""
    try:
        data = json.loads(fs.read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON: {e}") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected an object of instruction families, one at least")
    families = {}
    for name, family in data.items():
        where = f"{path}: family {name!r}"
        if not isinstance(family, dict) or set(family) != {"values", "long", "short"}:
            raise ValueError(f'{where}: needs exactly "values", "long" and "short"')
        values = family["values"]
        if not (isinstance(values, list) and values
                and all(isinstance(v, str) and v.strip() for v in values)):  # fmt: skip
            raise ValueError(f"{where}: values must be a non-empty list of non-empty strings")
        for key in ("long", "short"):
            if not isinstance(family[key], str) or family[key].count("{}") != 1:
                raise ValueError(f"{where}: {key} must be a string with exactly one {{}}")
            try:
                family[key].format("x")
            except (IndexError, KeyError, ValueError):
                raise ValueError(f"{where}: {key} has braces other than one {{}}") from None
        families[name] = Family(tuple(values), family["long"], family["short"])
    return families


def draw_instruction(rng: random.Random, families: Mapping[str, Family] = FAMILIES) -> Instruction:
    """A synthetic instruction: a random non-empty subset of the families, in random order,
    a random value of each; the full sentences joined by spaces, the short ones by " - "."""
    names = rng.sample(sorted(families), rng.randint(1, len(families)))
    chosen = {name: rng.choice(families[name].values) for name in names}
    long = " ".join(families[n].long.format(v) for n, v in chosen.items())
    short = " - ".join(families[n].short.format(v) for n, v in chosen.items())
    return Instruction(long, short, chosen)


def with_instruction(question: str, instruction: str) -> str:
    """A user message with the instruction concatenated (after a blank line)."""
    return f"{question.rstrip()}\n\n{instruction}"


def converse(
    engine: Engine,
    tokenizer,
    dialogs: Sequence[Sequence[dict]],
    sampling: SamplingConfig,
    slots: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[list[dict]], list[list[str]]]:
    """Each dialog (an optional system message, then user messages only) answered turn by
    turn by the model: turn t of every dialog that has one, as one batch on the engine
    (`slots` decoding at once), each prompt the dialog so far with its earlier answers.
    Returns the dialogs with an assistant message after each user one answered, and per
    dialog how each turn stopped: "eos", "length" (cut off by `max_new_tokens`) or "window"
    (the prompt and `max_new_tokens` no longer fit the model's window: the dialog ends there,
    unanswered). Dialog i's turn t draws from the random stream `i * MAX_TURNS + t`.
    `progress(turn, turns)` after each turn."""
    questions = []
    for i, dialog in enumerate(dialogs):
        roles = [m.get("role") for m in dialog]
        users = roles[1:] if roles[:1] == ["system"] else roles
        if not users or set(users) != {"user"}:
            raise ValueError(f"dialog {i}: needs user messages only (after an optional system "
                             f"prompt), got roles {roles}")  # fmt: skip
        if len(users) > MAX_TURNS:
            raise ValueError(f"dialog {i}: {len(users)} user turns; at most {MAX_TURNS}")
        questions.append([m for m in dialog if m["role"] == "user"])
    done = [[dict(m) for m in d if m["role"] == "system"] for d in dialogs]
    stops: list[list[str]] = [[] for _ in dialogs]
    window = engine.config.max_seq_len
    turns = max(len(q) for q in questions)
    for t in range(turns):
        live, prompts = [], []
        for i, q in enumerate(questions):
            if t < len(q) and "window" not in stops[i]:
                tokens = generation.chat_tokens([*done[i], q[t]], tokenizer)
                if len(tokens) + sampling.max_new_tokens > window:
                    stops[i].append("window")
                    continue
                done[i].append(dict(q[t]))
                live.append(i)
                prompts.append(tokens)
        if live:
            out = engine.generate(prompts, sampling, eos_id=tokenizer.eos_id, slots=slots,
                                  streams=[i * MAX_TURNS + t for i in live])  # fmt: skip
            for i, completion in zip(live, out, strict=True):
                new = completion.tokens[:-1] if completion.stop == "eos" else completion.tokens
                done[i].append({"role": "assistant",
                                "content": generation.answer_text(tokenizer, new)})  # fmt: skip
                stops[i].append(completion.stop)
        if progress:
            progress(t + 1, turns)
    return done, stops


def records_of(
    users: Sequence[str],
    answers: Sequence[str],
    instruction: Instruction,
    rng: random.Random,
    shorten: float = 0.5,
    turns: str = "every",
) -> list[dict]:
    """GAtt's training records of one sampled dialog: the instruction as the system prompt of
    the first turn (its short form with probability `shorten`), the user messages without
    it, every answer but the last of weight 0; one record per prefix (`turns="every"`) or
    the whole dialog only (`"last"`). Each record keeps its `instruction`."""
    if turns not in TURNS:
        raise ValueError(f"turns must be one of {TURNS}, got {turns!r}")
    system = instruction.short if rng.random() < shorten else instruction.long
    messages: list[dict] = [{"role": "system", "content": system}]
    out = []
    for k, (question, answer) in enumerate(zip(users, answers, strict=True)):
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": answer, "weight": 0}]  # fmt: skip
        if turns == "every" or k == len(users) - 1:
            last = {"role": "assistant", "content": answer}
            out.append({"messages": [*messages[:-1], last], "instruction": system})
    return out


TURNS = ("every", "last")


def read_dialogs(path: str, max_bytes: int | None = None) -> tuple[list[dict], dict[str, int]]:
    """The dialogs of a jsonl(.gz) file: records `{"messages": [...]}` whose user messages GAtt
    keeps (assistant messages are left out: their answers are sampled again), with an
    optional `"instruction"`. Returns the usable records (`users`, `instruction`, `line`)
    and the skipped ones counted by reason (not JSON, malformed, no user message, its own
    system prompt, too many turns), each skip logged with its line."""
    lines = JsonlRecords(path, max_bytes)
    out, skipped = [], collections.Counter()
    for i in range(len(lines)):
        try:
            record = records_lib.parse(lines[i])
            messages = record.get("messages")
            if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages
            ):
                raise BadRecord("malformed", 'needs "messages": a list of {role, content}')
            if any(m.get("role") == "system" for m in messages):
                raise BadRecord("own system prompt", "GAtt's instruction is the system prompt")
            users = [m["content"] for m in messages if m.get("role") == "user"]
            if not users or any(not u.strip() for u in users):
                raise BadRecord("no user message", "needs user messages, none empty")
            if len(users) > MAX_TURNS:
                raise BadRecord("too many turns", f"{len(users)} user turns; at most {MAX_TURNS}")
            instruction = record.get("instruction")
            if instruction is not None and not (isinstance(instruction, str)
                                                and instruction.strip()):  # fmt: skip
                raise BadRecord("malformed", '"instruction" must be a non-empty string')
        except BadRecord as e:
            skipped[e.reason] += 1
            log.warning("gatt: %s: skipped: %s", lines.where(i), e)
            continue
        out.append({"users": users, "instruction": instruction, "line": lines.where(i)})
    if not out:
        raise ValueError(f"{path}: no usable dialog ({dict(skipped) or 'the file is empty'})")
    return out, dict(skipped)


def build(
    engine: Engine,
    tokenizer,
    dialogs: Sequence[dict],
    sampling: SamplingConfig,
    families: Mapping[str, Family] = FAMILIES,
    shorten: float = 0.5,
    turns: str = "every",
    slots: int = 8,
    keep_truncated: bool = False,
) -> tuple[list[dict], dict]:
    """GAtt's records from `dialogs` (`read_dialogs`' records): each dialog's instruction
    (its own or `draw_instruction`'s, seeded by `sampling.seed`), its answers sampled with
    the instruction on every user message (`converse`), its records (`records_of`). Returns
    the records and a report (with `keep_truncated`, an answer cut off by `max_new_tokens`
    is kept as it is): dialogs, records, answers sampled, and the dialogs that ended
    before their last turn by why (a truncated answer, the window; "no turn left": those
    that ended before their first, so gave no record)."""
    if not 0.0 <= shorten <= 1.0:
        raise ValueError(f"shorten must be a probability in [0, 1], got {shorten}")
    if turns not in TURNS:
        raise ValueError(f"turns must be one of {TURNS}, got {turns!r}")
    rng = random.Random(sampling.seed)
    instructions = []
    for d in dialogs:
        given = d["instruction"]
        instructions.append(Instruction(given, given) if given else draw_instruction(rng, families))
    asked = [[{"role": "user", "content": with_instruction(u, inst.long)} for u in d["users"]]
             for d, inst in zip(dialogs, instructions, strict=True)]  # fmt: skip

    def progress(turn, total):
        log.info("gatt: turn %d/%d sampled", turn, total)

    answered, stops = converse(engine, tokenizer, asked, sampling, slots, progress)
    out, ended = [], collections.Counter()
    for d, inst, dialog, stop in zip(dialogs, instructions, answered, stops, strict=True):
        usable = ("eos", "length") if keep_truncated else ("eos",)
        keep = next((t for t, s in enumerate(stop) if s not in usable), len(stop))
        if keep < len(d["users"]):
            ended["truncated answer" if stop[keep] == "length" else "window"] += 1
        if keep == 0:
            ended["no turn left"] += 1
            continue
        answers = [m["content"] for m in dialog if m["role"] == "assistant"][:keep]
        out += records_of(d["users"][:keep], answers, inst, rng, shorten, turns)
    report = {"dialogs": len(dialogs), "records": len(out),
              "answers_sampled": sum(len(s) - (s[-1:] == ["window"]) for s in stops),
              "ended_early": dict(ended)}  # fmt: skip
    return out, report


def run(
    checkpoint: str,
    dialogs_file: str,
    output: str,
    sampling: SamplingConfig,
    *,
    families_file: str | None = None,
    shorten: float = 0.5,
    turns: str = "every",
    slots: int = 8,
    keep_truncated: bool = False,
    report: str | None = None,
    **load: Any,
) -> dict:
    """`llamax-gatt`: everything checked that can be before the model loads (the options,
    the families file, the dialogs), then the model loaded (`loading.load_engine`, `load`:
    its tokenizer, adapters, dtype, attention), GAtt's records built and written to `output`
    whole or not at all (none when no dialog kept a turn: an error), the report to `report`
    when given. Returns the report."""
    if not 0.0 <= shorten <= 1.0:
        raise ValueError(f"--shorten must be a probability in [0, 1], got {shorten}")
    if turns not in TURNS:
        raise ValueError(f"--turns must be one of {TURNS}, got {turns!r}")
    families = read_families(families_file) if families_file else FAMILIES
    fs.require_file(dialogs_file, "the dialogs")
    dialogs, skipped = read_dialogs(dialogs_file)
    if pretrained.read_model_config(checkpoint).head != "lm":
        raise ValueError(f"{checkpoint} is a reward model (a score head); GAtt samples from a "
                         "language model")  # fmt: skip
    engine, tokenizer = loading.load_engine(checkpoint, **load)
    records, result = build(engine, tokenizer, dialogs, sampling, families, shorten, turns,
                            slots, keep_truncated)  # fmt: skip
    if not records:
        raise ValueError(f"no record: no dialog of {dialogs_file} kept a turn "
                         f"({result['ended_early']})")  # fmt: skip
    fs.write_lines(output, [json.dumps(r, ensure_ascii=False) + "\n" for r in records])
    result |= {"skipped": skipped, "checkpoint": checkpoint, "dialogs_file": dialogs_file,
               "output": output, "temperature": sampling.temperature,
               "max_new_tokens": sampling.max_new_tokens, "seed": sampling.seed,
               "shorten": shorten, "turns": turns,
               "keep_truncated": keep_truncated}  # fmt: skip
    if report:
        fs.write_json(report, result, indent=1)
    return result
