"""LoRA reward models: adapters on a language model's frozen body with the score head training
beside them (PEFT's modules_to_save); the run loads as a reward model merged by hand, exports
to PEFT adapters that transformers + peft score as llamax does, imports back, resumes exactly,
and starts from a reward model's head on a quantized base."""

import json
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config
from test_reward import _pair, write_language_model

import llamax
from llamax import lora as lora_lib
from llamax import losses

TOL = 1e-4
RM = {"task": "reward", "model.vocab_size": 600, "model.head": "score",
      "data.source": "preference",
      "data.pairs_per_row": 2, "reward.margins": "none", "train.seq_len": 128,
      "train.steps": 8, "train.log_every": 1, "train.eval_every": 0, "checkpoint.every": 4,
      "optimizer.learning_rate": 1e-2, "optimizer.warmup_steps": 2, "optimizer.weight_decay": 0.0,
      "lora.rank": 4, "lora.alpha": 8.0, "lora.targets": "wq,wv,w2"}  # fmt: skip


def _files(directory):
    import hashlib

    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_path):
    """A language model (written, not trained), then 8 steps of LoRA reward modelling on it."""
    from llamax import train

    root = tmp_path_factory.mktemp("lora_rm")
    lm = write_language_model(str(root / "lm"), tokenizer_path)
    files = root / "pairs.jsonl"
    files.write_text("".join(json.dumps(_pair(i, None)) + "\n" for i in range(300)))
    c = rm_config(lm, str(files), tokenizer_path)
    before = _files(lm)
    state = train.run(c, str(root / "rm"))
    return types.SimpleNamespace(lm=lm, rm=str(root / "rm"), pairs=str(files), state=state,
                                 lm_files=before, root=root)  # fmt: skip


def rm_config(init_from, files, tokenizer_path, **overrides):
    c = load_config("tiny", **{**RM, "data.files": files, "data.tokenizer": tokenizer_path,
                               **overrides})  # fmt: skip
    c.init_from = init_from
    return c


def _batch(rng, vocab=600, lengths=(17, 12, 6)):
    """Rows right-padded with 0 (Hugging Face's pad id here), real tokens never 0."""
    width = max(lengths)
    tokens, segments = np.zeros((len(lengths), width), np.int32), np.zeros((len(lengths), width))
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.integers(3, vocab, n)
        segments[i, :n] = 1
    return tokens, segments.astype(np.int32)


def _scores(model, params, tokens, segments):
    out = model.apply({"params": params}, tokens, segment_ids=segments)
    values, present = losses.segment_last_values(out, segments, 1)
    assert present.all()
    return np.asarray(values[:, 0])


@pytest.mark.slow
def test_lora_reward_model_trains_adapters_and_score_on_a_frozen_body(runs):
    from llamax import loading, pretrained
    from llamax.metrics import read_metrics

    records = read_metrics(runs.rm)
    # A new score head scores near 0: the first loss is log 2.
    np.testing.assert_allclose(records[0]["loss"], np.log(2), atol=0.05)
    assert records[-1]["loss"] < 0.5 * records[0]["loss"], [r["loss"] for r in records]

    # What trains (and what the run's checkpoints hold): the adapters and the score head.
    state = runs.state
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.params)}
    want = {
        f"['layers']['{m}']['{t}_lora_{x}']"
        for m, t in [("attention", "wq"), ("attention", "wv"), ("feed_forward", "w2")]
        for x in "ab"
    }
    assert names == want | {"['score']"}
    assert state.params["score"].shape == (64, 1) and state.params["score"].dtype == jnp.float32
    adapters, lora, base = pretrained.run_adapters(runs.rm)
    assert set(adapters) == {"layers", "score"} and base == runs.lm and lora.rank == 4
    np.testing.assert_array_equal(adapters["score"], state.params["score"])
    assert np.abs(adapters["layers"]["attention"]["wq_lora_b"]).max() > 0

    # The frozen base is the language model's body (bfloat16), untouched; its files too.
    _, lm = loading.load_pretrained(runs.lm)
    assert "output" in lm and set(state.frozen) == {"tok_embeddings", "layers", "norm"}
    body = jax.tree.map(lambda x: x.astype(jnp.bfloat16), {k: lm[k] for k in state.frozen})
    jax.tree.map(np.testing.assert_array_equal, state.frozen, body)
    assert _files(runs.lm) == runs.lm_files


@pytest.mark.slow
def test_the_run_loads_as_its_base_merged_by_hand_with_its_score_head(runs, rng, tokenizer_path):
    """load_pretrained(run): a reward model, the base's body with W + s A B and the trained
    score head; the base with the run as --adapters is the same; a language model's
    commands refuse it; llamax-reward scores with it."""
    from llamax import loading, pretrained
    from llamax.cli import reward as reward_cli
    from llamax.data import preference
    from llamax.data.tokenizer import Tokenizer

    model, params = loading.load_pretrained(runs.rm)
    assert model.config.head == "score" and model.lora is None
    assert set(params) == {"tok_embeddings", "layers", "norm", "score"}
    adapters, lora, _ = pretrained.run_adapters(runs.rm)
    np.testing.assert_array_equal(params["score"], adapters["score"])

    _, lm = loading.load_pretrained(runs.lm)
    hand = jax.tree.map(np.array, {k: v for k, v in lm.items() if k != "output"})  # copies
    for module, target in [("attention", "wq"), ("attention", "wv"), ("feed_forward", "w2")]:
        w = hand["layers"][module][target]
        a = adapters["layers"][module][f"{target}_lora_a"]
        b = adapters["layers"][module][f"{target}_lora_b"]
        for i in range(w.shape[0]):
            delta = a[i].reshape(-1, lora.rank) @ b[i].reshape(lora.rank, -1)
            w[i] = w[i] + lora.scale * delta.reshape(w[i].shape)
    hand["score"] = adapters["score"]
    tokens, segments = _batch(rng)
    want = _scores(model, hand, tokens, segments)
    np.testing.assert_allclose(_scores(model, params, tokens, segments), want, atol=1e-5)
    assert np.abs(want).max() > 1e-2  # the scores are not all 0

    loaded, again = loading.load_pretrained(runs.lm, adapters=runs.rm)
    assert loaded.config.head == "score"
    np.testing.assert_allclose(_scores(loaded, again, tokens, segments), want, atol=1e-5)
    with pytest.raises(ValueError, match="with the adapters .* is a reward model .*needs a "
                                         "language model"):  # fmt: skip
        loading.load_with_tokenizer(runs.lm, tokenizer_path, adapters=runs.rm)

    answers = [{"prompt": f"What is {i} plus 2?", "response": f"It is {i + 2}."} for i in range(3)]
    (runs.root / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    out = str(runs.root / "scored.jsonl")
    assert reward_cli.main(["score", "--checkpoint", runs.rm, "--tokenizer", tokenizer_path,
                            "--input", str(runs.root / "answers.jsonl"),
                            "--output", out]) == 0  # fmt: skip
    tok = Tokenizer(tokenizer_path)
    for line, answer in zip(open(out), answers, strict=True):
        ids, _ = preference.response_tokens(answer["prompt"], answer["response"], tok)
        alone = model.apply({"params": params}, ids[None])[0, -1]
        assert json.loads(line)["score"] == pytest.approx(float(alone), abs=TOL)
    # The base with the run as --adapters: the same scores.
    flags = ["--tokenizer", tokenizer_path, "--input", str(runs.root / "answers.jsonl")]
    adapted = ["score", "--checkpoint", runs.lm, "--adapters", runs.rm, "--output", out + "2"]
    assert reward_cli.main(adapted + flags) == 0
    assert open(out + "2").read() == open(out).read()


@pytest.mark.slow
def test_peft_export_scores_as_llamax_in_transformers(runs, rng):
    """--to peft: a sequence classifier's adapters with the score head in modules_to_save;
    transformers' LlamaForSequenceClassification made of the converted language model (its
    score head random) with PeftModel.from_pretrained scores as llamax; the adapters merge
    back (--from peft) and load on the base (--adapters) to the same model, and what PEFT
    itself saves of them imports as the same arrays."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForSequenceClassification

    from llamax import convert, loading
    from llamax.convert import peft as peft_lib

    out = {k: str(runs.root / k) for k in ("peft", "hf_lm", "hf_rm", "back", "resaved")}
    convert.convert("llamax", "hf", runs.lm, out["hf_lm"])
    convert.convert("llamax", "peft", runs.rm, out["peft"], base_name=out["hf_lm"])
    config = json.loads(open(os.path.join(out["peft"], "adapter_config.json")).read())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    model, params = loading.load_pretrained(runs.rm)
    tokens, segments = _batch(rng)
    want = _scores(model, params, tokens, segments)

    def hf_scores(m):
        with torch.no_grad():
            return m(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits[:, 0].numpy()

    base = LlamaForSequenceClassification.from_pretrained(
        out["hf_lm"], num_labels=1, pad_token_id=0, dtype=torch.float32
    ).eval()
    assert np.abs(hf_scores(base) - want).max() > 1e-2  # its own score head is random
    peft_model = PeftModel.from_pretrained(base, out["peft"]).eval()
    np.testing.assert_allclose(hf_scores(peft_model), want, atol=TOL)

    convert.convert("llamax", "hf", runs.rm, out["hf_rm"])  # merged: a plain sequence classifier
    merged = LlamaForSequenceClassification.from_pretrained(out["hf_rm"], dtype=torch.float32)
    np.testing.assert_allclose(hf_scores(merged.eval()), want, atol=TOL)

    convert.convert("peft", "llamax", out["peft"], out["back"], base=runs.lm)
    back_model, back = loading.load_pretrained(out["back"])
    assert back_model.config.head == "score"
    np.testing.assert_allclose(_scores(back_model, back, tokens, segments), want, atol=TOL)
    on_base, on_params = loading.load_pretrained(runs.lm, adapters=out["peft"])
    np.testing.assert_allclose(_scores(on_base, on_params, tokens, segments), want, atol=TOL)

    # PEFT's own files, its names and config (not the embedding: base_model_name_or_path is
    # the llamax base, whose config.json PEFT cannot compare vocabularies with).
    peft_model.save_pretrained(out["resaved"], save_embedding_layers=False)
    ours, lora = peft_lib.import_adapters(out["peft"], model.config.replace(head="lm"))
    theirs, lora_back = peft_lib.import_adapters(out["resaved"], model.config.replace(head="lm"))
    assert lora_back == lora and set(theirs) == {"layers", "score"}
    jax.tree.map(np.testing.assert_array_equal, theirs, ours)


def test_peft_modules_llamax_cannot_train_are_named(tmp_path):
    from llamax.convert import peft as peft_lib
    from llamax.convert.formats import FormatError

    config = llamax.LlamaConfig.preset("tiny")
    out = tmp_path / "a"
    out.mkdir()
    adapter = peft_lib.adapter_config(lora_lib.LoraConfig(rank=4), score=True)
    (out / "adapter_config.json").write_text(
        json.dumps({**adapter, "modules_to_save": ["score", "lm_head"]})
    )
    named = r"\['modules_to_save'\] \(modules_to_save \['score', 'lm_head'\]: only a reward"
    with pytest.raises(ValueError, match=named):
        peft_lib.import_adapters(str(out), config)
    (out / "adapter_config.json").write_text(json.dumps({**adapter, "modules_to_save": None}))
    with pytest.raises(FormatError, match="need a reward model as their base"):
        peft_lib.import_adapters(str(out), config)


@pytest.mark.slow
def test_a_lora_reward_run_resumes_exactly(runs, tokenizer_path):
    """Stopped after the checkpoint of step 4 (adapters, score head, optimizer state): the
    resumed run re-reads the base, checks its fingerprint, and repeats steps 5-8."""
    from llamax import train
    from llamax.metrics import read_metrics

    resumed = str(runs.root / "resumed")
    shutil.copytree(runs.rm, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "8"))
    train.run(rm_config(runs.lm, runs.pairs, tokenizer_path), resumed)
    want = {r["step"]: r["loss"] for r in read_metrics(runs.rm)}
    got = {r["step"]: r["loss"] for r in read_metrics(resumed)}
    np.testing.assert_allclose([got[k] for k in (5, 6, 7, 8)], [want[k] for k in (5, 6, 7, 8)],
                               rtol=1e-5)  # fmt: skip


@pytest.mark.slow
def test_from_a_reward_model_on_a_quantized_base_the_head_is_its_own(runs, tokenizer_path):
    """init_from a reward model (the run merged into a checkpoint) with an nf4 base: the body's
    matrices held as nf4 codes, the score head trained on from the reward model's."""
    from llamax import convert, loading, setup, state

    merged = str(runs.root / "rm_merged")
    convert.convert("llamax", "llamax", runs.rm, merged)
    c = rm_config(merged, runs.pairs, tokenizer_path, **{"lora.base_dtype": "nf4"})
    s = setup.build(c, setup.make_mesh(c))
    no_checkpoint = types.SimpleNamespace(latest_step=lambda: None)
    start, meta = state.restore_or_init(s, no_checkpoint, None)
    assert meta == {} and set(start.frozen) == {"tok_embeddings", "layers", "norm"}
    assert start.frozen["layers"]["attention"]["wq"].dtype == jnp.uint8
    _, rm = loading.load_pretrained(merged)
    np.testing.assert_array_equal(start.params["score"], rm["score"])
    assert not np.any(start.params["layers"]["attention"]["wq_lora_b"])  # fresh adapters
