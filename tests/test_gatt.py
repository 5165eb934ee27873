"""Ghost Attention's data tool (Llama 2, section 3.3): synthetic instructions from the families,
combined and shortened; answers sampled turn by turn with the instruction on every user
message (the prompts the model saw, read back); the training records with the instruction in
the first turn only and the loss on the last turn only (the chat data's own mask); the window
and truncation ending a dialog; `llamax-gatt` end to end and its refusals."""

import json
import random

import numpy as np
import pytest

import llamax
from llamax import gatt, generation
from llamax.cli import gatt as cli
from llamax.data import chat_format
from llamax.data.tokenizer import Tokenizer
from llamax.inference import Completion, Engine, SamplingConfig


def test_synthetic_instructions_combine_the_families_in_full_and_short():
    rng = random.Random(0)
    draws = [gatt.draw_instruction(rng) for _ in range(300)]
    sizes = {len(d.chosen) for d in draws}
    assert sizes == {1, 2, 3}
    assert {n for d in draws for n in d.chosen} == set(gatt.FAMILIES)
    for d in draws:
        names = list(d.chosen)
        assert d.long == " ".join(gatt.FAMILIES[n].long.format(d.chosen[n]) for n in names)
        assert d.short.split(" - ") == [gatt.FAMILIES[n].short.format(d.chosen[n]) for n in names]
        assert all(d.chosen[n] in gatt.FAMILIES[n].values for n in names)
    orders = {tuple(d.chosen) for d in draws if len(d.chosen) == 3}
    assert len(orders) > 1  # combined in random order
    again = [gatt.draw_instruction(random.Random(0)) for _ in range(1)]
    assert again[0] == draws[0]
    one = {"mood": gatt.Family(("calm",), "Stay {}.", "Mood: {}")}
    assert gatt.draw_instruction(rng, one) == gatt.Instruction("Stay calm.", "Mood: calm",
                                                               {"mood": "calm"})  # fmt: skip


@pytest.mark.parametrize(
    "content, message",
    [("{", "not JSON"), ("[]", "object of instruction families"),
     ('{"a": {"values": ["x"], "long": "{}"}}', 'needs exactly "values"'),
     ('{"a": {"values": [], "long": "{}", "short": "{}"}}', "non-empty list"),
     ('{"a": {"values": ["x"], "long": "no slot", "short": "{}"}}', "exactly one {}"),
     ('{"a": {"values": ["x"], "long": "{} {0}", "short": "{}"}}', "braces other than"),
     ('{"a": {"values": ["x"], "long": "{} {k}", "short": "{}"}}', "braces other than")],
)  # fmt: skip
def test_a_bad_families_file_is_an_error_naming_it(content, message, tmp_path):
    path = tmp_path / "families.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as e:
        gatt.read_families(str(path))
    assert str(path) in str(e.value)


def test_a_families_file_replaces_the_built_in_ones(tmp_path):
    path = tmp_path / "families.json"
    path.write_text(json.dumps({"tone": {"values": ["dry", "warm"], "long": "Be {}.",
                                         "short": "Tone: {}"}}))  # fmt: skip
    families = gatt.read_families(str(path))
    assert families == {"tone": gatt.Family(("dry", "warm"), "Be {}.", "Tone: {}")}


USERS = ["the model?", "and the optimizer?", "the weights?"]
ANSWERS = ["llama", "adamw", "float32"]


@pytest.mark.parametrize("turns", ["every", "last"])
def test_records_keep_the_instruction_in_the_first_turn_and_the_loss_on_the_last(
    turns, tokenizer_path
):
    tok = Tokenizer(tokenizer_path)
    inst = gatt.Instruction("Always act as Napoleon.", "Figure: Napoleon", {"figure": "Napoleon"})
    records = gatt.records_of(USERS, ANSWERS, inst, random.Random(0), shorten=0.0, turns=turns)
    assert len(records) == (3 if turns == "every" else 1)
    for record in records:
        messages = record["messages"]
        k = (len(messages) - 1) // 2  # the turns of this record
        assert messages[0] == {"role": "system", "content": inst.long}
        assert [m["content"] for m in messages[1::2]] == USERS[:k]  # no instruction in them
        assert [m["content"] for m in messages[2::2]] == ANSWERS[:k]
        assert [m.get("weight", 1) for m in messages[2::2]] == [0] * (k - 1) + [1]
        # The chat data's mask: exactly the last answer and its EOS, one span to the end.
        tokens, mask = chat_format.example_tokens(record, tok)
        plain = [{key: v for key, v in m.items() if key != "weight"} for m in messages]
        assert tokens.tolist() == chat_format.dialog_tokens(plain, tok)[0]
        on = np.flatnonzero(mask)
        assert (on == np.arange(on[0], len(mask))).all() and tokens[-1] == tok.eos_id
        assert tok.decode(tokens[on].tolist()).strip() == ANSWERS[k - 1]
    short = gatt.records_of(USERS, ANSWERS, inst, random.Random(0), shorten=1.0)
    assert {r["messages"][0]["content"] for r in short} == {"Figure: Napoleon"}
    mixed = [gatt.records_of(USERS[:1], ANSWERS[:1], inst, random.Random(s))[0]["instruction"]
             for s in range(200)]  # fmt: skip
    assert 0.35 < mixed.count("Figure: Napoleon") / 200 < 0.65


class RecordingEngine:
    """An engine that answers every prompt "ok <n>" and keeps the prompts it was given."""

    def __init__(self, tok, max_seq_len=10_000, cut_at=None):
        self.tok, self.prompts, self.streams = tok, [], []
        self.config = llamax.LlamaConfig.preset("tiny", max_seq_len=max_seq_len)
        self.cut_at = cut_at  # (dialog stream, turn) whose answer is cut off

    def generate(self, prompts, sampling, eos_id, slots, streams):
        self.prompts += [self.tok.decode(p) for p in prompts]
        self.streams += list(streams)
        out = []
        for s in streams:
            ids = self.tok.encode(f"ok {s}", bos=False, eos=False)
            cut = self.cut_at is not None and s == self.cut_at
            out.append(Completion(ids if cut else [*ids, eos_id], np.zeros(len(ids)),
                                  "length" if cut else "eos"))  # fmt: skip
        return out


def test_answers_are_sampled_with_the_instruction_on_every_user_message(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    engine = RecordingEngine(tok)
    dialogs = [
        {"users": USERS, "instruction": None, "line": "a:1"},
        {"users": USERS[:1], "instruction": "Answer in one word.", "line": "a:2"},
    ]
    records, report = gatt.build(engine, tok, dialogs, SamplingConfig(seed=3), shorten=0.0)
    drawn = gatt.draw_instruction(random.Random(3))  # the first dialog's, from the seed
    # Turn by turn: turn 0 of both dialogs, then turns 1 and 2 of the first.
    assert engine.streams == [0, gatt.MAX_TURNS, 1, 2]
    for prompt, (user, inst) in zip(
        engine.prompts,
        [(USERS[0], drawn.long), (USERS[0], "Answer in one word."), (USERS[1], drawn.long),
         (USERS[2], drawn.long)],
        strict=True,
    ):  # fmt: skip
        assert prompt.count(inst) == prompt.count("[INST]")  # on every user message
        assert prompt.rstrip().endswith(f"{user}\n\n{inst} [/INST]")
    assert "ok 0" in engine.prompts[2] and "ok 1" in engine.prompts[3]  # earlier answers
    assert report == {"dialogs": 2, "records": 4, "answers_sampled": 4, "ended_early": {}}
    assert [r["messages"][0]["content"] for r in records] == [drawn.long] * 3 + [
        "Answer in one word."
    ]
    assert records[2]["messages"][2::2] == [
        {"role": "assistant", "content": "ok 0", "weight": 0},
        {"role": "assistant", "content": "ok 1", "weight": 0},
        {"role": "assistant", "content": "ok 2"},
    ]


def test_a_truncated_answer_or_the_window_ends_a_dialog_before_that_turn(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    dialogs = [{"users": USERS, "instruction": "Be brief.", "line": "a:1"},
               {"users": USERS, "instruction": "Be brief.", "line": "a:2"}]  # fmt: skip
    engine = RecordingEngine(tok, cut_at=gatt.MAX_TURNS + 1)  # dialog 1, turn 1: cut off
    records, report = gatt.build(engine, tok, dialogs, SamplingConfig(), turns="last")
    assert report["ended_early"] == {"truncated answer": 1}
    assert [len(r["messages"]) for r in records] == [7, 3]  # 3 turns, then 1 turn
    # A window that holds two turns of the first dialog but not three.
    so_far = [
        {"role": "user", "content": gatt.with_instruction(USERS[0], "Be brief.")},
        {"role": "assistant", "content": "ok 0"},
        {"role": "user", "content": gatt.with_instruction(USERS[1], "Be brief.")},
    ]
    two = len(generation.chat_tokens(so_far, tok))
    engine = RecordingEngine(tok, max_seq_len=two + SamplingConfig().max_new_tokens)
    records, report = gatt.build(engine, tok, dialogs[:1], SamplingConfig(), turns="last")
    assert report["ended_early"] == {"window": 1} and report["answers_sampled"] == 2
    assert len(records[0]["messages"]) == 5
    engine = RecordingEngine(tok, max_seq_len=8)
    records, report = gatt.build(engine, tok, dialogs[:1], SamplingConfig())
    assert report["ended_early"] == {"window": 1, "no turn left": 1} and records == []


def test_greedy_turns_are_the_models_own_answers_to_the_dialog_so_far(tokenizer_path):
    """`converse` against the public `generate`, called turn by turn by hand."""
    tok = Tokenizer(tokenizer_path)
    config = llamax.LlamaConfig.preset("tiny", vocab_size=600)
    from conftest import random_params

    model, params = llamax.Llama(config), random_params(config, seed=5)
    dialogs = [[{"role": "system", "content": "Be brief."}, *({"role": "user", "content": u}
                                                              for u in USERS)],
               [{"role": "user", "content": u} for u in USERS[:2]]]  # fmt: skip
    sampling = SamplingConfig(max_new_tokens=5)
    done, stops = gatt.converse(Engine(model, params), tok, dialogs, sampling, slots=2)
    for dialog, answered in zip(dialogs, done, strict=True):
        so_far = [m for m in dialog if m["role"] == "system"]
        for user in (m for m in dialog if m["role"] == "user"):
            so_far.append(user)
            (ids,) = generation.generate(model, params, [generation.chat_tokens(so_far, tok)],
                                         max_new_tokens=5, eos_id=tok.eos_id)  # fmt: skip
            so_far.append({"role": "assistant", "content": generation.answer_text(tok, ids)})
        assert answered == so_far
    assert [len(s) for s in stops] == [3, 2]
    assert set(sum(stops, [])) <= {"eos", "length"}


def _write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def test_llamax_gatt_writes_chat_data_and_its_report(tiny_lm, tmp_path, capsys):
    dialogs = _write(tmp_path / "dialogs.jsonl", [
        {"messages": [{"role": "user", "content": u} for u in USERS]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                      {"role": "user", "content": "r"}], "instruction": "Be brief."},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]},
        "{not json",
    ])  # fmt: skip
    out, report = str(tmp_path / "gatt.jsonl"), str(tmp_path / "report.json")
    argv = ["--checkpoint", tiny_lm, "--dialogs", dialogs, "--output", out, "--report", report,
            "--max-new-tokens", "4", "--seed", "2", "--keep-truncated"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "gatt: 5 records from 2 dialogs" in capsys.readouterr().out
    records = [json.loads(line) for line in open(out)]
    assert [len(r["messages"]) for r in records] == [3, 5, 7, 3, 5]
    assert {r["messages"][0]["content"] for r in records[3:]} == {"Be brief."}
    counts = json.load(open(report))
    assert counts["skipped"] == {"own system prompt": 1, "not JSON": 1}
    assert counts["records"] == 5 and counts["dialogs"] == 2
    # It is chat SFT data: every record an example whose loss is on its last answer.
    tok = Tokenizer(f"{tiny_lm}/tokenizer.model")
    for r in records:
        _, mask = chat_format.example_tokens(r, tok)
        assert mask.any()
    # The same seed, the same records.
    again = str(tmp_path / "again.jsonl")
    assert cli.main([*argv[:5], again, *argv[8:]]) == 0
    assert open(again).read() == open(out).read()
    # Nothing is overwritten.
    assert cli.main(argv) == 2
    assert "--output" in capsys.readouterr().err


def test_llamax_gatt_refuses_what_it_cannot_use(tiny_lm, tiny_rm, tmp_path, capsys):
    dialogs = _write(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])
    out = str(tmp_path / "o.jsonl")
    base = ["--dialogs", dialogs, "--output", out]
    assert cli.main(["--checkpoint", tiny_rm, *base]) == 2
    assert "reward model" in capsys.readouterr().err
    assert cli.main(["--checkpoint", tiny_lm, *base, "--dialogs", str(tmp_path / "none")]) == 2
    assert "none" in capsys.readouterr().err
    long = _write(
        tmp_path / "long.jsonl", [{"messages": [{"role": "user", "content": "q " * 300}]}]
    )
    assert cli.main(["--checkpoint", tiny_lm, *base[2:], "--dialogs", long]) == 2
    assert "no record" in capsys.readouterr().err and not (tmp_path / "o.jsonl").exists()
    only_bad = _write(tmp_path / "bad.jsonl", ['{"messages": []}'])
    assert cli.main(["--checkpoint", tiny_lm, *base[2:], "--dialogs", only_bad]) == 2
    assert "no usable dialog" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--checkpoint", tiny_lm, *base, "--shorten", "2"])
    assert "--shorten" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--checkpoint", tiny_lm, *base, "--temperature", "-1"])
    assert not (tmp_path / "o.jsonl").exists()
