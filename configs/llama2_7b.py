"""Llama 2 7B pretraining with the paper's recipe (Touvron et al. 2023, section 2.2).

    # on every worker of the TPU VM slice:
    # tfds reads local paths: the bucket mounted by scripts/mount_bucket.sh BUCKET ~/gcs/BUCKET
    llamax-train --config configs/llama2_7b.py --workdir gs://BUCKET/runs/llama2-7b \
        --config.data.tfds_data_dir=$HOME/gcs/BUCKET/tensorflow_datasets \
        --config.data.tokenizer=$HOME/llama/tokenizer.model

Recipe: `llamax.experiment.llama2_recipe` (4k context, 4M-token batches, 2T tokens), peak
learning rate 3e-4.

Hardware: a v5e-256 slice (256 chips, 16 GiB each), fsdp over all chips: each of the 4
micro-batches of 256 sequences puts one on every chip. Ahead-of-time check (llamax-aot,
docs/tpu_fit.md): 4 sequences per chip without accumulation take 7.01 GiB per chip with
splash attention (`--config.model.attention=splash`), so the recipe's one fits; on v5p-8,
1 per chip takes 29.10 GiB of 95. Expected result: the paper's training
curve (its Figure 5); the TPU throughput has not been measured.
Data: `c4/en:3.1.0` from tfds, prepared once as ArrayRecord in the data dir
(`tfds build c4/en --file_format=array_record`), and Meta's Llama 2 `tokenizer.model`.
"""

from llamax.experiment import llama2_recipe


def get_config():
    return llama2_recipe("llama2-7b", learning_rate=3e-4)
