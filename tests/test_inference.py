"""The inference engine: greedy generation equals transformers', log-probabilities equal a full
forward's, continuous batching gives each prompt what it gets alone, prompt lengths compile
one prefill per bucket, the scoring path equals the model's own outputs, and a mesh of 8
devices computes what one device does."""

import jax
import numpy as np
import pytest
from conftest import hf_model, llamax_params_from, random_params

import llamax
from llamax import inference, sharding
from llamax.inference import Engine, SamplingConfig

CONFIG = llamax.LlamaConfig.preset("tiny")
TOL = 1e-5


@pytest.fixture(scope="module")
def hf():
    """A transformers model and the same weights in llamax."""
    model = hf_model(CONFIG, weight_std=0.3)
    return model, llamax_params_from(model, CONFIG)


@pytest.fixture(scope="module")
def engine(hf):
    return Engine(llamax.Llama(CONFIG), hf[1])


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [[1, *rng.integers(3, CONFIG.vocab_size, n - 1).tolist()] for n in lengths]


def _full_logprobs(model, params, prompt, new, logits=None):
    """log_softmax of a full forward over prompt + new (or of its `logits`), at each new
    token: [len(new)]."""
    tokens = np.asarray([[*prompt, *new]], np.int32)
    logits = model.apply({"params": params}, tokens)[0] if logits is None else logits
    logp = np.asarray(jax.nn.log_softmax(logits.astype(np.float32), axis=-1))
    return np.array([logp[len(prompt) - 1 + i, t] for i, t in enumerate(new)])


def test_greedy_generation_equals_transformers(hf, engine):
    import torch

    model, _ = hf
    prompts = _prompts([3, 11, 20])
    done = engine.generate(prompts, SamplingConfig(max_new_tokens=12), eos_id=-1)
    for prompt, completion in zip(prompts, done, strict=True):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)  # fmt: skip
        assert completion.tokens == out[0, len(prompt) :].tolist()
        assert completion.stop == "length"
    # The public function, on the engine: the same tokens.
    assert llamax.generate(llamax.Llama(CONFIG), hf[1], prompts, 12, eos_id=-1) == [
        c.tokens for c in done
    ]


@pytest.mark.parametrize(
    "sampling",
    [SamplingConfig(10), SamplingConfig(10, temperature=1.3, top_k=5, seed=3),
     SamplingConfig(10, temperature=0.8, top_p=0.5, seed=4)],
)  # fmt: skip
def test_log_probabilities_are_a_full_forwards(hf, engine, sampling):
    """Each new token's log-probability is the model's own (log_softmax of a full forward at
    it), whatever the temperature and cut that drew it; the cuts hold: top-k draws among the
    k most likely, top-p within the nucleus."""
    model, params = llamax.Llama(CONFIG), hf[1]
    prompts = _prompts([4, 13])
    for prompt, done in zip(prompts, engine.generate(prompts, sampling, eos_id=-1), strict=True):
        want = _full_logprobs(model, params, prompt, done.tokens)
        np.testing.assert_allclose(done.logprobs, want, atol=TOL, rtol=0)
        tokens = np.asarray([[*prompt, *done.tokens]], np.int32)
        logits = np.asarray(model.apply({"params": params}, tokens)[0])
        for i, token in enumerate(done.tokens):
            row = logits[len(prompt) - 1 + i] / max(sampling.temperature, 1e-9)
            rank = int(np.sum(row > row[token]))
            if sampling.temperature == 0:
                assert rank == 0
            if sampling.top_k:
                assert rank < sampling.top_k
            if sampling.top_p < 1:
                probs = np.exp(row - row.max())
                probs /= probs.sum()
                assert np.sum(probs[row > row[token]]) < sampling.top_p


def test_continuous_batching_gives_each_prompt_what_it_gets_alone(engine):
    """Seven prompts through two slots (a finished row's slot takes the next prompt), greedy
    and sampled, stopping at EOS or at their length: each prompt's tokens and log-probabilities
    are those it gets alone in one slot (its random stream is its own)."""
    prompts = _prompts([5, 17, 3, 9, 30, 12, 7], seed=1)
    for sampling in (SamplingConfig(9), SamplingConfig(9, temperature=1.0, top_p=0.9, seed=7)):
        # An EOS the model does produce: the most frequent token of the first run.
        first = engine.generate(prompts, sampling, eos_id=-1, slots=2)
        eos = int(np.bincount(np.concatenate([c.tokens for c in first])).argmax())
        batched = engine.generate(prompts, sampling, eos_id=eos, slots=2, steps=3)
        assert {c.stop for c in batched} == {"eos", "length"}
        for i, prompt in enumerate(prompts):
            (alone,) = engine.generate([prompt], sampling, eos_id=eos, streams=[i])
            assert batched[i].tokens == alone.tokens
            np.testing.assert_allclose(batched[i].logprobs, alone.logprobs, atol=TOL)
            stop = batched[i].tokens[-1] == eos
            assert batched[i].stop == ("eos" if stop else "length")
            assert stop or len(batched[i].tokens) == 9
            assert eos not in batched[i].tokens[:-1]


def test_ten_prompt_lengths_compile_one_prefill_per_bucket():
    config = CONFIG.replace(max_seq_len=200)  # a model of its own: no compile shared
    engine = Engine(llamax.Llama(config), random_params(config, seed=1))
    lengths = [2, 5, 9, 15, 16, 17, 30, 33, 60, 64]
    buckets = {engine.bucket(n) for n in lengths}
    assert buckets == {16, 32, 64}
    before = inference._prefill._cache_size(), inference._decode._cache_size()
    for n in lengths:
        engine.generate(_prompts([n]), SamplingConfig(4), eos_id=-1)
    prefills = inference._prefill._cache_size() - before[0]
    decodes = inference._decode._cache_size() - before[1]
    assert prefills == decodes == len(buckets)  # a decode state's length: bucket + 16
    assert [inference.bucket(n, 200) for n in (1, 16, 17, 129, 200, 201)] == [
        16, 16, 32, 200, 200, 256]  # fmt: skip
    assert [inference.decode_length(n, new, 200) for n, new in
            ((1, 1), (17, 16), (32, 128), (33, 17), (129, 60), (100, 100))] == [
        32, 48, 160, 96, 200, 200]  # fmt: skip


def test_a_prompt_that_ends_at_once_is_done_at_its_prefill(engine, monkeypatch):
    """A prompt whose first token is EOS (or that asks for one token) is done at its prefill,
    with no decode step; the tokens returned hold the EOS, `llamax.generate` leaves it out."""
    prompt = _prompts([6])[0]
    (greedy,) = engine.generate([prompt], SamplingConfig(5), eos_id=-1)
    decoded = []
    decode = Engine.decode
    monkeypatch.setattr(Engine, "decode", lambda self, *a, **k: decoded.append(1) or decode(
        self, *a, **k))  # fmt: skip
    (done,) = engine.generate([prompt], SamplingConfig(5), eos_id=greedy.tokens[0])
    assert done.tokens == greedy.tokens[:1] and done.stop == "eos" and not decoded
    (one,) = engine.generate([prompt], SamplingConfig(1), eos_id=-1)
    assert one.tokens == greedy.tokens[:1] and one.stop == "length" and not decoded
    got = llamax.generate(engine.model, engine.params, [prompt], 5, eos_id=greedy.tokens[2])
    assert got == [greedy.tokens[:2]] and decoded


def test_the_scoring_path_equals_the_models_outputs(hf, engine, monkeypatch):
    """Per-token log-probabilities (the chunked cross-entropy), greedy agreement and a
    reward model's last-token scores, for sequences of several lengths in calls of 2 rows,
    equal the model's own forward of each sequence alone."""
    model, params = llamax.Llama(CONFIG), hf[1]
    sequences = _prompts([20, 3, 17, 2, 25], seed=2)
    # And one that continues with the model's own greedy tokens: flags True there.
    (own,) = engine.generate(sequences[1:2], SamplingConfig(8), eos_id=-1)
    sequences.append(sequences[1] + own.tokens)
    logprobs = engine.token_logprobs(sequences, batch_size=2)
    greedy = engine.greedy_logprobs(sequences, batch_size=2)

    def alone(apply, seq):
        """`apply`'s outputs at each token of `seq` in a row of its own (zeros after it, which
        a causal model's outputs at seq's tokens never see: one compile for all)."""
        return np.asarray(apply(np.asarray([seq + [0] * (64 - len(seq))])))[: len(seq)]

    forward = jax.jit(lambda tokens: model.apply({"params": params}, tokens)[0])
    for seq, lp, (glp, right) in zip(sequences, logprobs, greedy, strict=True):
        logits = alone(forward, seq)
        want = _full_logprobs(model, params, seq[:1], seq[1:], logits)
        # Both float32 sums over the vocabulary, in another order: relative 1e-5.
        np.testing.assert_allclose(lp, want, atol=TOL, rtol=TOL)
        np.testing.assert_allclose(glp, want, atol=TOL, rtol=TOL)
        np.testing.assert_array_equal(right, logits[:-1].argmax(-1) == np.asarray(seq[1:]))
    assert greedy[-1][1][-8:].all()

    rm = CONFIG.replace(head="score")
    # The language model's body with a score head: a reward model.
    head = np.random.default_rng(4).normal(size=(CONFIG.dim, 1)).astype(np.float32)
    rm_model = llamax.Llama(rm)
    rm_params = {**{k: v for k, v in params.items() if k != "output"}, "score": head}
    scores = Engine(rm_model, rm_params).last_scores(sequences, batch_size=2)
    rm_forward = jax.jit(lambda tokens: rm_model.apply({"params": rm_params}, tokens)[0])
    want = [alone(rm_forward, s)[-1] for s in sequences]
    np.testing.assert_allclose(scores, want, atol=1e-4)
    with pytest.raises(ValueError, match="need a reward model"):
        engine.last_scores(sequences)
    with pytest.raises(ValueError, match="generation needs a language model"):
        Engine(rm_model, rm_params).generate(sequences, SamplingConfig(2))
    # A call's buffers beyond the memory: refused before any row is scored.
    monkeypatch.setattr(inference, "available_memory", lambda host=False: (1000, "the test's"))
    with pytest.raises(ValueError, match=r"scoring 2 rows of up to 32 tokens needs about .* "
                       r"more than the test's \(1,000 bytes\): score fewer rows"):  # fmt: skip
        engine.token_logprobs(sequences, batch_size=2)


def test_an_engine_of_per_layer_weights_uses_them_and_donation_frees_the_stacked(hf):
    params = jax.tree.map(lambda x: x.copy(), hf[1])
    first = Engine(llamax.Llama(CONFIG), params, donate=True)
    assert all(x.is_deleted() for x in jax.tree.leaves(params["layers"]))
    assert sorted(first.params) == ["layers_0", "layers_1", "norm", "output", "tok_embeddings"]
    again = Engine(first.model, first.params)
    assert all(a is b for a, b in zip(jax.tree.leaves(first.params),
                                      jax.tree.leaves(again.params), strict=True))  # fmt: skip


@pytest.mark.slow
def test_a_mesh_of_8_devices_computes_what_one_device_does(hf, engine):
    """Weights sharded as training shards them (data 2 x fsdp 2 x tensor 2), decode slots
    split over the rows: the same greedy and sampled tokens, log-probabilities and scores."""
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    model = llamax.Llama(CONFIG)
    boxed = llamax.model.abstract_params(model)
    params = jax.device_put(hf[1], sharding.tree_shardings(boxed, mesh))
    sharded = Engine(model, params)
    assert sharded.mesh is mesh
    wq = sharded.params["layers_0"]["attention"]["wq"]
    assert wq.sharding.spec == sharding.mesh_axes(("embed", "heads", "head_dim"), wq.shape, mesh)
    assert len(wq.sharding.device_set) == 8
    prompts = _prompts([5, 17, 3, 9, 30], seed=3)
    for sampling in (SamplingConfig(6), SamplingConfig(6, temperature=1.0, top_k=20, seed=2)):
        one = engine.generate(prompts, sampling, eos_id=-1, slots=4)
        eight = sharded.generate(prompts, sampling, eos_id=-1, slots=4)
        for a, b in zip(one, eight, strict=True):
            assert a.tokens == b.tokens
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
    for a, b in zip(engine.token_logprobs(prompts, 4), sharded.token_logprobs(prompts, 4),
                    strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b, atol=1e-4)
