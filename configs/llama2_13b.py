"""Llama 2 13B pretraining with the paper's recipe (Touvron et al. 2023, section 2.2).

    # on every worker of the TPU VM slice:
    # tfds reads local paths: the bucket mounted by scripts/mount_bucket.sh BUCKET ~/gcs/BUCKET
    llamax-train --config configs/llama2_13b.py --workdir gs://BUCKET/runs/llama2-13b \
        --config.data.tfds_data_dir=$HOME/gcs/BUCKET/tensorflow_datasets \
        --config.data.tokenizer=$HOME/llama/tokenizer.model

Recipe: `llamax.experiment.llama2_recipe` (4k context, 4M-token batches, 2T tokens), peak
learning rate 3e-4.

Hardware: a v4-512 slice (256 chips, 32 GiB each), fsdp over all chips: each of the 4
micro-batches of 256 sequences puts one on every chip. Ahead-of-time check (llamax-aot,
docs/tpu_fit.md): 1 sequence per chip takes 9.04 GiB per chip on v4-64 with splash
attention (`--config.model.attention=splash`); more chips hold less of the state each; on
v5p-64, 2 per chip take 11.44 GiB of 95. Expected result: the paper's
training curve (its Figure 5); the TPU throughput has not been measured.
Data: `c4/en:3.1.0` from tfds, prepared once as ArrayRecord in the data dir
(`tfds build c4/en --file_format=array_record`), and Meta's Llama 2 `tokenizer.model`.
"""

from llamax.experiment import llama2_recipe


def get_config():
    return llama2_recipe("llama2-13b", learning_rate=3e-4)
