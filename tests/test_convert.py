"""Weight conversion (Meta, Hugging Face, llamax) and generation on converted weights."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import hf_logits, hf_model

import llamax
from llamax import convert
from llamax.cli import convert as convert_cli
from llamax.cli import generate as generate_cli
from llamax.convert import formats
from llamax.data.tokenizer import Tokenizer
from llamax.generation import chat_tokens

TOL = 1e-4

CONFIGS = {
    1: llamax.LlamaConfig.preset("tiny", ffn_dim_multiplier=1.3, multiple_of=16),  # GQA 4:2
    2: llamax.LlamaConfig.preset("tiny-mha", n_layers=3),  # multi-head
    8: llamax.LlamaConfig(  # 70B's shape in small: 8 kv heads, one per shard
        dim=128, n_layers=2, n_heads=16, n_kv_heads=8, vocab_size=256, multiple_of=64,
        ffn_dim_multiplier=1.3, max_seq_len=128,
    ),
}  # fmt: skip


HF_TO_META_LAYER = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def write_meta_checkpoint(model, config, directory, shards):
    """Meta's release layout, built here from the Hugging Face weights: rotary rows back to
    Meta's interleaved order, then split as fairscale's parallel layers split them."""
    os.makedirs(directory)
    h = config.head_dim
    hf_to_meta = {"embed_tokens": "tok_embeddings", "norm": "norm", "lm_head": "output"}
    meta = {}
    for name, w in model.state_dict().items():
        w = w.clone()
        if name.startswith("model.layers."):
            i, rest = name.split(".")[2], ".".join(name.split(".")[3:])
            n = {
                "self_attn.q_proj.weight": config.n_heads,
                "self_attn.k_proj.weight": config.kv_heads,
            }.get(rest)
            if n is not None:  # inverse of Meta's permute: w.view(n, H/2, 2, D).transpose(1, 2)
                w = w.view(n, 2, h // 2, config.dim).transpose(1, 2).reshape(n * h, config.dim)
                back = w.view(n, h // 2, 2, config.dim).transpose(1, 2).reshape(n * h, config.dim)
                assert torch.equal(back, model.state_dict()[name])
            meta[f"layers.{i}.{HF_TO_META_LAYER[rest]}"] = w
        else:
            meta[hf_to_meta[name.split(".")[-2]] + ".weight"] = w
    column = ("wq.", "wk.", "wv.", "w1.", "w3.", "output.")
    row = ("wo.", "w2.", "tok_embeddings.")
    for k in range(shards):
        shard = {"rope.freqs": torch.ones(h // 2)}
        for name, w in meta.items():
            if any(f".{c}" in f".{name}" for c in column):
                w = w.chunk(shards, dim=0)[k]
            elif any(f".{r}" in f".{name}" for r in row):
                w = w.chunk(shards, dim=1)[k]
            shard[name] = w.clone()
        torch.save(shard, os.path.join(directory, f"consolidated.{k:02d}.pth"))
    params = {
        "dim": config.dim,
        "multiple_of": config.multiple_of,
        "n_heads": config.n_heads,
        "n_layers": config.n_layers,
        "norm_eps": config.norm_eps,
        "vocab_size": -1,
    }
    if config.n_kv_heads:
        params["n_kv_heads"] = config.n_kv_heads
    if config.ffn_dim_multiplier:
        params["ffn_dim_multiplier"] = config.ffn_dim_multiplier
    with open(os.path.join(directory, "params.json"), "w") as f:
        json.dump(params, f)
    return meta


@pytest.mark.parametrize("shards", sorted(CONFIGS))
def test_meta_to_llamax_matches_transformers(shards, tmp_path, rng):
    config = CONFIGS[shards]
    model = hf_model(config)
    write_meta_checkpoint(model, config, str(tmp_path / "meta"), shards)
    out = str(tmp_path / "llamax")
    convert.convert("meta", "llamax", str(tmp_path / "meta"), out)
    ours, params = llamax.load_pretrained(out)
    tokens = rng.integers(0, config.vocab_size, (2, 24), dtype=np.int32)
    err = np.abs(
        np.asarray(ours.apply({"params": params}, tokens)) - hf_logits(model, tokens)
    ).max()
    print(f"{shards} shard(s): max |logits - transformers| = {err:.2e}")
    assert err <= TOL
    assert convert.verify(out) == []


def test_meta_round_trip_is_exact(tmp_path):
    config = CONFIGS[2]
    written = write_meta_checkpoint(hf_model(config), config, str(tmp_path / "meta"), 2)
    convert.convert("meta", "llamax", str(tmp_path / "meta"), str(tmp_path / "llamax"))
    convert.convert("llamax", "meta", str(tmp_path / "llamax"), str(tmp_path / "back"), shards=2)
    for k in range(2):
        got = torch.load(tmp_path / "back" / f"consolidated.{k:02d}.pth")
        want = torch.load(tmp_path / "meta" / f"consolidated.{k:02d}.pth")
        assert sorted(got) == sorted(want)
        for name in want:
            if name != "rope.freqs":
                assert torch.equal(got[name], want[name]), name
    assert len(written) == len(got) - 1
    with open(tmp_path / "back" / "params.json") as f, open(tmp_path / "meta" / "params.json") as g:
        assert json.load(f) == json.load(g)


@pytest.mark.parametrize("max_shard_size", [None, "40KB"])
def test_hf_round_trip_is_exact_and_loadable(max_shard_size, tmp_path, rng):
    from transformers import LlamaForCausalLM

    config = CONFIGS[1]
    model = hf_model(config)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(tmp_path / "hf", **kwargs)
    if max_shard_size:
        assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    convert.convert("hf", "llamax", str(tmp_path / "hf"), str(tmp_path / "llamax"))
    convert.convert("llamax", "hf", str(tmp_path / "llamax"), str(tmp_path / "back"))
    back = LlamaForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    for name, w in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], w), name
    tokens = rng.integers(0, config.vocab_size, (1, 12), dtype=np.int32)
    np.testing.assert_array_equal(hf_logits(back, tokens), hf_logits(model, tokens))


def test_greedy_generation_equals_transformers(tmp_path):
    config = CONFIGS[1]
    model = hf_model(config, weight_std=0.3)
    write_meta_checkpoint(model, config, str(tmp_path / "meta"), 1)
    convert.convert("meta", "llamax", str(tmp_path / "meta"), str(tmp_path / "llamax"))
    ours, params = llamax.load_pretrained(str(tmp_path / "llamax"))
    prompts = [[1, 5, 9, 33, 17, 80, 3], [1, 200], [1, 44, 45, 46]]
    got = llamax.generate(ours, params, prompts, max_new_tokens=16)
    for prompt, new in zip(prompts, got, strict=True):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                             eos_token_id=2, pad_token_id=0)  # fmt: skip
        want = out[0, len(prompt) :].tolist()
        assert new == (want[: want.index(2)] if 2 in want else want)


@pytest.mark.slow
def test_sampling_is_seeded_and_respects_top_k(tmp_path):
    config = CONFIGS[1]
    model = llamax.Llama(config)
    params = llamax.model.init_params(model, __import__("jax").random.key(0))
    kwargs = {"max_new_tokens": 10, "temperature": 1.0, "top_k": 1, "seed": 3}
    # top_k=1 is greedy whatever the temperature.
    assert llamax.generate(model, params, [[1, 7]], **kwargs) == llamax.generate(
        model, params, [[1, 7]], 10
    )
    a = llamax.generate(model, params, [[1, 7]], 10, temperature=1.0, top_p=0.9, seed=1)
    assert a == llamax.generate(model, params, [[1, 7]], 10, temperature=1.0, top_p=0.9, seed=1)
    with pytest.raises(ValueError, match="Bad sampling settings"):
        llamax.generate(model, params, [[1]], 4, top_p=0.0)


def _meta_chat_reference(dialog, tok):
    """Meta's `Llama.chat_completion` dialog tokenization, transcribed from generation.py."""
    B_INST, E_INST = "[INST]", "[/INST]"
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
    if dialog[0]["role"] == "system":
        dialog = [
            {
                "role": dialog[1]["role"],
                "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"],
            }
        ] + dialog[2:]
    dialog_tokens = sum(
        [
            tok.encode(
                f"{B_INST} {(prompt['content']).strip()} {E_INST} {(answer['content']).strip()} ",
                bos=True,
                eos=True,
            )
            for prompt, answer in zip(dialog[::2], dialog[1::2], strict=False)
        ],
        [],
    )
    dialog_tokens += tok.encode(
        f"{B_INST} {(dialog[-1]['content']).strip()} {E_INST}", bos=True, eos=False
    )
    return dialog_tokens


def test_chat_format_equals_meta(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    dialogs = [
        [{"role": "user", "content": "the model trains"}],
        [{"role": "system", "content": "Answer in one word."},
         {"role": "user", "content": " the optimizer? "},
         {"role": "assistant", "content": "adamw"},
         {"role": "user", "content": "and the weights\nnaïve café"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
         {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"},
         {"role": "user", "content": "e"}],
    ]  # fmt: skip
    for dialog in dialogs:
        assert chat_tokens(dialog, tok) == _meta_chat_reference(dialog, tok)
    with pytest.raises(ValueError, match="last turn"):
        chat_tokens([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], tok)
    with pytest.raises(ValueError, match="Special tags"):
        chat_tokens([{"role": "user", "content": "[INST] sneaky"}], tok)


@pytest.fixture
def two_shards(tmp_path):
    config = CONFIGS[1].replace(n_kv_heads=2)
    write_meta_checkpoint(hf_model(config), config, str(tmp_path / "meta"), 2)
    return tmp_path / "meta"


def _fails(tmp_path, message, src="meta", directory=None):
    out = tmp_path / "out"
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        convert.convert(src, "llamax", str(directory or tmp_path / "meta"), str(out))
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith("out")]
    assert not leftovers, leftovers  # nothing half-written


def test_missing_shard(two_shards, tmp_path):
    os.rename(two_shards / "consolidated.01.pth", two_shards / "consolidated.02.pth")
    _fails(tmp_path, r"missing \['consolidated.01.pth'\], unexpected \['consolidated.02.pth'\]")


def test_lost_last_shard(two_shards, tmp_path):
    os.remove(two_shards / "consolidated.01.pth")
    _fails(tmp_path, "has shape .* but params.json implies")


def test_extra_shard(two_shards, tmp_path):
    shutil.copy(two_shards / "consolidated.01.pth", two_shards / "consolidated.02.pth")
    _fails(tmp_path, "3 shards do not fit n_heads = 4")


def test_params_json_disagrees(two_shards, tmp_path):
    params = json.loads((two_shards / "params.json").read_text())
    (two_shards / "params.json").write_text(json.dumps({**params, "n_layers": 3}))
    _fails(tmp_path, r"consolidated.00.pth: the config says 3 layers, but the weights hold 2")


def test_truncated_shard(two_shards, tmp_path):
    data = (two_shards / "consolidated.00.pth").read_bytes()
    (two_shards / "consolidated.00.pth").write_bytes(data[: len(data) // 2])
    _fails(tmp_path, "truncated")


def test_read_error_midway_leaves_nothing(two_shards, tmp_path, monkeypatch):
    """An input that fails while the output is being streamed (the 12th tensor read) stops
    the writer and removes everything written so far."""
    load, calls = formats.LazyTensor.load, []

    def failing(self):
        calls.append(self)
        if len(calls) == 12:
            raise formats.FormatError("simulated read error")
        return load(self)

    monkeypatch.setattr(formats.LazyTensor, "load", failing)
    _fails(tmp_path, "simulated read error")


def test_unknown_layouts(tmp_path):
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "weights.bin").write_bytes(b"x")
    _fails(tmp_path, "not a Meta Llama checkpoint")
    _fails(tmp_path, "not a Hugging Face Llama checkpoint", src="hf")
    _fails(tmp_path, "Input directory not found", directory=tmp_path / "nowhere")


def test_hf_index_names_missing_file(tmp_path):
    hf_model(CONFIGS[1]).save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    shards = sorted(p for p in os.listdir(tmp_path / "hf") if p.startswith("model-"))
    os.remove(tmp_path / "hf" / shards[-1])
    _fails(tmp_path, "shards named in the index are missing", src="hf", directory=tmp_path / "hf")


def test_cli_convert_verify_and_generate(tmp_path, tokenizer_path, capsys):
    config = CONFIGS[1].replace(vocab_size=600)
    write_meta_checkpoint(hf_model(config), config, str(tmp_path / "meta"), 1)
    shutil.copy(tokenizer_path, tmp_path / "tokenizer.model")  # Meta's place: next to the shards
    out = str(tmp_path / "ckpt")
    assert convert_cli.main(["--from", "meta", "--to", "llamax", "--input", str(tmp_path / "meta"),
                             "--output", out]) == 0  # fmt: skip
    assert os.path.exists(os.path.join(out, "tokenizer.model"))
    assert convert_cli.main(["--verify", out]) == 0
    assert convert_cli.main(["--from", "meta", "--to", "llamax", "--input", str(tmp_path / "meta"),
                             "--output", out]) == 2  # fmt: skip
    assert "exists" in capsys.readouterr().err
    assert (
        generate_cli.main(["--checkpoint", out, "--prompt", "the model", "--max-new-tokens", "5"])
        == 0
    )
    chat = ["--prompt", "hi", "--chat", "--system", "be brief", "--max-new-tokens", "5"]
    assert generate_cli.main(["--checkpoint", out, *chat]) == 0
    capsys.readouterr()
    with open(os.path.join(out, "config.json"), "a") as f:
        f.write(" ")
    assert convert_cli.main(["--verify", out]) == 1
    assert "config.json" in capsys.readouterr().out
