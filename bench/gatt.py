"""Ghost Attention on CPU, measured as Llama 2's Appendix A.3.5 measures it: the share of turns,
up to 20, whose answer still follows the system instruction, without and with GAtt.

    .venv/bin/python bench/gatt.py [--workdir runs/gatt]

The task has instructions that can be checked exactly. A user turn asks `say list 3`; the plain
answer repeats it, `list 3`. Three instruction families (the paper's: language, public figure,
hobby), written as a `llamax-gatt --instructions` file, change the answer: a language writes
the number in that language (`list trois`), a figure opens with its catchword (`Sire: list
3`), a hobby closes with a tag (`list 3 #chess`); combined, `Sire: list trois #chess`. An
answer follows the instruction when it has every part the instruction asks for and no other
(`follows`: the word and number it repeats are content, checked apart by `exact`).

The SFT model (the demo-shaped base of bench/finetune.py, fine-tuned on chat data) is trained
as Llama 2's SFT data was, by the paper's account: it knows how to follow an instruction, not
how to keep one. Its dialogs are plain dialogs of 1 to 20 turns, single-turn dialogs whose
system prompt is an instruction (full or shortened), and multi-turn dialogs where some user
turns carry an instruction for that turn (`gatt.with_instruction`). No dialog in it keeps a
system instruction for more than one turn.

GAtt, as section 3.3 builds it: `llamax-gatt` samples 2 to 20-turn dialogs from the SFT model
with a synthetic instruction (from the families file) on every user message, and writes them
with the instruction as the first turn's system prompt only (shortened half of the time) and
the loss on the last turn only, one record per turn (`--turns every`); the SFT model is then
fine-tuned on them with SFT records mixed in (`--sft-share` of them per GAtt record: an SFT
record holds 4.6 times the target tokens of a GAtt record, so a 1:1 mix gives GAtt less than
a fifth of the loss). Both models answer 48 held-out 20-turn dialogs
with a system instruction (full form for half, short for half), greedy; reported: the share
of turns that follow it, at turn 1 and over turns 2-5, 6-10, 11-20 and all 20 (and exactly
right), and on 24 20-turn dialogs without a system prompt, the share of plain answers (GAtt
must not make the model follow instructions nobody gave). One JSON line each, a
markdown table for docs/preference.md, and the per-turn plot docs/gatt_turns.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import finetune  # noqa: E402  (bench/finetune.py: the base model)
import preference  # noqa: E402  (bench/preference.py: configs, training)
from finetune import write_jsonl  # noqa: E402

WORDS = ["list", "dict", "set", "map", "zip", "int", "str", "len", "sum", "max", "min", "abs"]
NUMBERS = {
    "English": ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
    "French": ["un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf"],
    "German": ["eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun"],
    "Spanish": ["uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve"],
}
LANGUAGES = ["French", "German", "Spanish"]
FIGURES = {"Napoleon": "Sire:", "Caesar": "Ave:", "Archimedes": "Eureka:"}
HOBBIES = ["chess", "golf", "tennis"]
FAMILIES = {
    "language": {"values": LANGUAGES, "long": "Always answer in {}.", "short": "Language: {}"},
    "figure": {"values": list(FIGURES), "long": "Always act as {}.", "short": "Figure: {}"},
    "hobby": {"values": HOBBIES, "long": "You enjoy {}.", "short": "Hobby: {}"},
}
SEQ_LEN = 768  # 20 turns of the longest answers: about 680 tokens
NEW_TOKENS = 24  # the longest answer ("Eureka: dict cuatro #tennis") is 17 tokens with EOS
TURNS = 20


def question(rng: random.Random) -> tuple[str, str, int]:
    word, n = rng.choice(WORDS), rng.randint(1, 9)
    return f"say {word} {n}", word, n


def answer(word: str, n: int, chosen: dict) -> str:
    number = NUMBERS[chosen["language"]][n - 1] if "language" in chosen else str(n)
    text = f"{word} {number}"
    if "figure" in chosen:
        text = f"{FIGURES[chosen['figure']]} {text}"
    if "hobby" in chosen:
        text = f"{text} #{chosen['hobby']}"
    return text


def follows(text: str, chosen: dict) -> bool:
    """The answer keeps the instruction, every part of it and nothing else: the figure's
    catchword first (none without a figure), the number a word of the language (a digit
    without one), the hobby's tag last (none without a hobby). The word and number repeated
    from the question are the answer's content, not the instruction: `exact` checks them."""
    words = text.split()
    if not words:
        return False
    figure = FIGURES.get(chosen.get("figure"))
    if (words[0] == figure) != bool(figure) or (not figure and words[0] in FIGURES.values()):
        return False
    words = words[1:] if figure else words
    hobby = chosen.get("hobby")
    tag = words[-1] if words and words[-1].startswith("#") else None
    if tag != (f"#{hobby}" if hobby else None):
        return False
    words = words[:-1] if hobby else words
    if len(words) != 2:
        return False
    language = chosen.get("language")
    return words[1] in NUMBERS[language] if language else words[1].isdigit()


def exact(text: str, word: str, n: int, chosen: dict) -> bool:
    """The whole answer right: the instruction kept and the question's word and number."""
    return text.strip() == answer(word, n, chosen)


def sft_dialogs(rng: random.Random, n: int) -> list[list[dict]]:
    from llamax import gatt

    families = {k: gatt.Family(tuple(v["values"]), v["long"], v["short"])
                for k, v in FAMILIES.items()}  # fmt: skip
    out = []
    for _ in range(n):
        kind = rng.random()
        turns = []
        if kind < 0.3:  # one turn, the instruction as the system prompt
            inst = gatt.draw_instruction(rng, families)
            turns.append(
                {"role": "system", "content": inst.long if rng.random() < 0.5 else inst.short}
            )
            q, word, k = question(rng)
            turns += [{"role": "user", "content": q},
                      {"role": "assistant", "content": answer(word, k, inst.chosen)}]  # fmt: skip
        else:  # plain turns, and (kind >= 0.6) some turns with their own instruction
            for _ in range(rng.randint(1, TURNS)):
                q, word, k = question(rng)
                chosen = {}
                if kind >= 0.6 and rng.random() < 0.3:
                    inst = gatt.draw_instruction(rng, families)
                    q, chosen = gatt.with_instruction(q, inst.long), inst.chosen
                turns += [{"role": "user", "content": q},
                          {"role": "assistant", "content": answer(word, k, chosen)}]  # fmt: skip
        out.append(turns)
    return out


def evaluate(path: str, held: list[dict]):
    """Greedy 20-turn conversations: per dialog and turn, whether the answer follows the
    instruction (`follows`) and whether it is exactly right (`exact`); the answers."""
    import numpy as np

    from llamax import gatt, loading
    from llamax.inference import SamplingConfig

    engine, tok = loading.load_engine(path)
    dialogs = [d["messages"] for d in held]
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS)
    done, stops = gatt.converse(engine, tok, dialogs, sampling, 16)
    ok, right, texts = np.zeros((len(held), TURNS)), np.zeros((len(held), TURNS)), []
    for i, (d, answered) in enumerate(zip(held, done, strict=True)):
        answers = [m["content"] for m in answered if m["role"] == "assistant"]
        texts.append(answers)
        for t, (word, n) in enumerate(d["asked"]):
            ok[i, t] = t < len(answers) and follows(answers[t], d["chosen"])
            right[i, t] = t < len(answers) and exact(answers[t], word, n, d["chosen"])
    return ok, right, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/gatt")
    parser.add_argument("--base-steps", type=int, default=150)
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--gatt-steps", type=int, default=300)
    parser.add_argument(
        "--sft-share", type=float, default=0.125,
        help="SFT records mixed in, per GAtt record (an SFT record has about 4.6 times the "
        "target tokens of a GAtt record, whose loss is on its last answer only)",
    )  # fmt: skip
    parser.add_argument("--gatt-lr", type=float, default=1e-3)
    parser.add_argument("--name", default="gatt", help="the GAtt fine-tune's run directory")
    parser.add_argument("--gatt-dialogs", type=int, default=300)
    args = parser.parse_args()
    w = args.workdir
    os.makedirs(w, exist_ok=True)
    emit = lambda r: print(json.dumps({"bench": "gatt", **r}), flush=True)  # noqa: E731
    import numpy as np

    from llamax import gatt

    tokenizer = finetune.demo_tokenizer(w)
    base = finetune.pretrain_base(w, args.base_steps, tokenizer)
    long = {"model.max_seq_len": SEQ_LEN, "train.seq_len": SEQ_LEN, "train.batch_size": 8,
            "data.source": "chat"}  # fmt: skip

    rng = random.Random(0)
    sft_records = [{"messages": d} for d in sft_dialogs(rng, 6000)]
    data = write_jsonl(os.path.join(w, "sft.jsonl"), sft_records)
    t0 = time.time()
    sft = preference.train(
        preference.config("sft", base, tokenizer, data, args.sft_steps, 1e-3, **long),
        os.path.join(w, "sft"),
    )
    emit({"stage": "sft", "seconds": round(time.time() - t0), "loss": sft["last_loss"]})

    # GAtt's data from the SFT model, with llamax-gatt itself.
    families = os.path.join(w, "families.json")
    with open(families, "w") as f:
        json.dump(FAMILIES, f)
    users = [{"messages": [{"role": "user", "content": question(rng)[0]}
                           for _ in range(rng.randint(2, TURNS))]}
             for _ in range(args.gatt_dialogs)]  # fmt: skip
    dialogs = write_jsonl(os.path.join(w, "gatt_dialogs.jsonl"), users)
    out = os.path.join(w, "gatt.jsonl")
    t0 = time.time()
    if not os.path.exists(out):
        subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "llamax-gatt"),
             "--checkpoint", sft["path"], "--dialogs", dialogs, "--output", out,
             "--instructions", families, "--report", os.path.join(w, "gatt_report.json"),
             "--max-new-tokens", str(NEW_TOKENS), "--temperature", "0.7",
             "--batch-size", "16"],
            check=True,
        )  # fmt: skip
    report = json.load(open(os.path.join(w, "gatt_report.json")))
    emit({"stage": "llamax-gatt", "seconds": round(time.time() - t0), **report})
    # How many sampled answers follow their instruction (the model's in-turn skill).
    gatt_records = [json.loads(line) for line in open(out)]
    mixed = gatt_records + sft_records[: int(len(gatt_records) * args.sft_share)]
    random.Random(1).shuffle(mixed)
    data = write_jsonl(os.path.join(w, f"{args.name}_mix.jsonl"), mixed)
    t0 = time.time()
    tuned = preference.train(
        preference.config(
            "sft", sft["path"], tokenizer, data, args.gatt_steps, args.gatt_lr, **long
        ),
        os.path.join(w, args.name),
    )
    emit({"stage": "gatt fine-tune", "seconds": round(time.time() - t0),
          "records": len(gatt_records), "loss": tuned["last_loss"]})  # fmt: skip

    # Held out: 20-turn dialogs with a system instruction, and without one.
    held_rng = random.Random(7)
    fams = {k: gatt.Family(tuple(v["values"]), v["long"], v["short"]) for k, v in FAMILIES.items()}
    held = []
    for i in range(72):
        asked = [question(held_rng) for _ in range(TURNS)]
        messages = [{"role": "user", "content": q} for q, _, _ in asked]
        chosen = {}
        if i < 48:
            inst = gatt.draw_instruction(held_rng, fams)
            chosen = inst.chosen
            system = inst.long if i % 2 == 0 else inst.short
            messages = [{"role": "system", "content": system}, *messages]
        held.append({"messages": messages, "chosen": chosen,
                     "asked": [(word, n) for _, word, n in asked]})  # fmt: skip
    rows = {}
    for name, path in (("SFT", sft["path"]), ("SFT + GAtt", tuned["path"])):
        t0 = time.time()
        ok, right, texts = evaluate(path, held)
        with open(os.path.join(w, f"answers_{name.replace(' ', '')}.json"), "w") as f:
            json.dump([{**d, "answers": a} for d, a in zip(held, texts, strict=True)], f)
        inst, plain = ok[:48], ok[48:]
        row = {
            "turn_1": inst[:, 0].mean(), "turns_2_5": inst[:, 1:5].mean(),
            "turns_6_10": inst[:, 5:10].mean(), "turns_11_20": inst[:, 10:].mean(),
            "all_20": inst.mean(), "exact_all_20": right[:48].mean(),
            "no_system_prompt": plain.mean(), "exact_no_system_prompt": right[48:].mean(),
            "by_turn": [round(float(x), 3) for x in inst.mean(0)],
        }  # fmt: skip
        rows[name] = row
        shown = {k: v if k == "by_turn" else round(float(v), 3) for k, v in row.items()}
        emit({"model": name, "seconds": round(time.time() - t0), **shown})

    print(f"\nMeasured on {platform.machine()} ({os.cpu_count()} cores); the share of turns "
          "that follow the system instruction (48 dialogs of 20 turns):\n")  # fmt: skip
    print("| model | turn 1 | turns 2-5 | turns 6-10 | turns 11-20 | all 20 | all 20, exact | "
          "no system prompt: plain | exact |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        cells = [r[k] for k in ("turn_1", "turns_2_5", "turns_6_10", "turns_11_20", "all_20",
                                "exact_all_20", "no_system_prompt",
                                "exact_no_system_prompt")]  # fmt: skip
        print(f"| {name} | " + " | ".join(f"{c:.0%}" for c in cells) + " |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name, r in rows.items():
        ax.plot(range(1, TURNS + 1), r["by_turn"], marker="o", label=name)
    ax.set(xlabel="turn", ylabel="share following the system instruction", ylim=(-0.02, 1.02),
           xticks=range(1, TURNS + 1, 2))  # fmt: skip
    ax.legend()
    fig.tight_layout()
    docs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
    fig.savefig(os.path.join(docs, "gatt_turns.png"), dpi=110)
    np.save(os.path.join(w, "by_turn.npy"), np.array([r["by_turn"] for r in rows.values()]))


if __name__ == "__main__":
    main()
