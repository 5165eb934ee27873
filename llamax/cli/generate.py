"""`llamax-generate --checkpoint DIR [--adapters DIR] --prompt TEXT [--chat] [--system TEXT]`.

Loads a converted checkpoint (or a training run's workdir) with its `tokenizer.model`, LoRA
adapters merged in when given (a PEFT adapter directory or a llamax LoRA run's workdir), and
prints the continuation of the prompt; with `--chat`, the prompt is the user's turn of a
Llama 2 chat dialog formatted exactly as Meta's `chat_completion` does, and the answer is
printed without the space the chat format puts before its EOS. A prompt and
`--max-new-tokens` longer than the model's window (`max_seq_len`), or a prompt that is not
UTF-8 text, is refused before the model is loaded.
"""

from __future__ import annotations

import argparse
import logging
import sys

from llamax.cli import add_execution_flags, error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llamax-generate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--adapters", help="LoRA adapters on the checkpoint: PEFT dir or run")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--chat", action="store_true", help="format as a Llama 2 chat turn")
    parser.add_argument("--system", help="system prompt (with --chat)")
    parser.add_argument("--tokenizer", help="default: CHECKPOINT/tokenizer.model")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    add_execution_flags(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.system and not args.chat:
        parser.error("--system needs --chat")

    import llamax
    from llamax import generation, loading, pretrained

    try:
        sampling = generation.Sampling.from_flags(args)
    except ValueError as e:
        parser.error(str(e))
    try:
        for flag, text in (("--prompt", args.prompt), ("--system", args.system or "")):
            generation.check_text(text, flag)
        if args.adapters:
            loading.require_adapters_dir(args.adapters)
        # The request meets the model's window before the model is loaded.
        config = pretrained.read_model_config(args.checkpoint)
        tokenizer = loading.checkpoint_tokenizer(args.checkpoint, args.tokenizer,
                                                    config.vocab_size)  # fmt: skip
        ids = _prompt_ids(args, tokenizer)
        generation.check_window(config, len(ids), sampling.max_new_tokens)
        model, params, tokenizer = loading.load_with_tokenizer(
            args.checkpoint,
            args.tokenizer,
            dtype=args.dtype,
            adapters=args.adapters,
            attention=args.attention,
        )
        (out,) = llamax.generate(
            model, params, [ids], max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            seed=sampling.seed, eos_id=tokenizer.eos_id,
        )  # fmt: skip
    except (ValueError, OSError) as e:
        return error("llamax-generate", e)
    print(generation.answer_text(tokenizer, out) if args.chat else tokenizer.decode(out))
    return 0


def _prompt_ids(args, tokenizer) -> list[int]:
    """The prompt's tokens: a Llama 2 chat turn (with its system prompt) or the text as it is."""
    from llamax.generation import chat_tokens

    if not args.chat:
        return tokenizer.encode(args.prompt, bos=True, eos=False)
    dialog = [{"role": "system", "content": args.system}] if args.system else []
    return chat_tokens([*dialog, {"role": "user", "content": args.prompt}], tokenizer)


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
