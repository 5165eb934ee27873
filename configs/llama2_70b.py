"""Llama 2 70B pretraining with the paper's recipe (Touvron et al. 2023, section 2.2).

    # on every worker of the TPU VM slice:
    llamax-train --config configs/llama2_70b.py --workdir $HOME/runs/llama2-70b \
        --config.data.tfds_data_dir=gs://BUCKET/tensorflow_datasets \
        --config.data.tokenizer=$HOME/llama/tokenizer.model

Recipe: 4,096-token context, global batch 1,024 sequences (4M tokens) as 4 accumulated
micro-batches, AdamW (0.9, 0.95, eps 1e-5, weight decay 0.1), peak learning rate 1.5e-4, 2,000
warmup steps, cosine decay to 10%, clipping at 1.0, bfloat16 compute on float32 master
weights, full remat; 500,000 steps = 2T tokens.

Hardware: a v5p-512 slice (256 chips), fsdp over all chips. Expected result: the paper's
training curve (its Figure 5). Neither the TPU throughput nor the per-chip memory of this
config has been measured yet (the ahead-of-time fit check, llamax-aot, is a later issue).
Data: C4 English from tensorflow-datasets (`c4/en:3.1.0`, prepared once as ArrayRecord in
the data dir: `tfds build c4/en --file_format=array_record`), tokenized with Meta's Llama 2
`tokenizer.model`.
"""

from llamax.train import llama2_recipe


def get_config():
    return llama2_recipe("llama2-70b", learning_rate=1.5e-4)
