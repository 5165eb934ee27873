"""Llama 2 7B extended from 4,096 to 32,768 tokens by position interpolation.

    llamax-convert --from meta --to llamax --input llama-2-7b --output $HOME/ckpt/llama2-7b
    # on every worker of the TPU VM slice (scripts/extend_context.sh runs this for you):
    # tfds reads local paths: the bucket mounted by scripts/mount_bucket.sh BUCKET ~/gcs/BUCKET
    llamax-train --config configs/llama2_7b_extend_32k.py \
        --workdir gs://BUCKET/runs/llama2-7b-32k \
        --config.init_from=$HOME/ckpt/llama2-7b \
        --config.data.tfds_data_dir=$HOME/gcs/BUCKET/tensorflow_datasets \
        --config.data.tokenizer=$HOME/ckpt/llama2-7b/tokenizer.model
    llamax-eval perplexity --checkpoint gs://BUCKET/runs/llama2-7b-32k \
        --lengths 2048,4096,8192,16384,32768 --tfds pg19 --split test \
        --tokenizer $HOME/ckpt/llama2-7b/tokenizer.model --output eval/32k
    llamax-eval passkey --checkpoint gs://BUCKET/runs/llama2-7b-32k \
        --lengths 4096,8192,16384,32768 \
        --tokenizer $HOME/ckpt/llama2-7b/tokenizer.model --output eval/32k

Recipe (`llamax.experiment.context_extension_recipe`, Chen et al. 2023, arXiv:2306.15595): linear
rotary scaling x8, 1,000 steps of 64 x 32,768 tokens (2M tokens per step) at
learning rate 2e-5 after 20 warmup steps, on C4 English (the paper used the Pile; a corpus of
long documents, such as pg19 in `--config.data.tfds_name`, teaches more of the long range);
full remat and `auto` attention (splash on TPU, cuDNN on GPU, else chunked).

Hardware: a v4-128 slice (64 chips, 32 GiB each), fsdp over all chips, 1 sequence per chip.
Ahead-of-time check (llamax-aot, docs/tpu_fit.md): 15.73 GiB per chip with splash on v4-128
at 1 sequence per chip, of 32 GiB.
Expected, from the paper (its Tables 1, 2 and 4, Llama 7B at 32k): perplexity that keeps
falling as the context grows to 32,768 tokens, within a few percent of the 4k model's at
2,048, and passkey retrieval near 100% at every length up to 32,768.
"""

from llamax.experiment import context_extension_recipe


def get_config():
    return context_extension_recipe("llama2-7b", seq_len=32768)
