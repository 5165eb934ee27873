"""Llama 2 7B pretraining with the paper's recipe (Touvron et al. 2023, section 2.2).

    # on every worker of the TPU VM slice:
    llamax-train --config configs/llama2_7b.py --workdir $HOME/runs/llama2-7b \
        --config.data.tfds_data_dir=gs://BUCKET/tensorflow_datasets \
        --config.data.tokenizer=$HOME/llama/tokenizer.model

Recipe: `llamax.train.llama2_recipe` (4k context, 4M-token batches, 2T tokens), peak
learning rate 3e-4.

Hardware: a v5p-128 slice (64 chips), fsdp over all chips. Expected result: the paper's
training curve (its Figure 5). Neither the TPU throughput nor the per-chip memory of this
config has been measured yet (the ahead-of-time fit check, llamax-aot, is a later issue).
Data: `c4/en:3.1.0` from tfds, prepared once as ArrayRecord in the data dir
(`tfds build c4/en --file_format=array_record`), and Meta's Llama 2 `tokenizer.model`.
"""

from llamax.train import llama2_recipe


def get_config():
    return llama2_recipe("llama2-7b", learning_rate=3e-4)
