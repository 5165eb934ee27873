"""Llama 2 7B pretraining with the paper's recipe (Touvron et al. 2023, section 2.2).

    # on every worker of the TPU VM slice:
    llamax-train --config configs/llama2_7b.py --workdir $HOME/runs/llama2-7b \
        --config.data.tfds_data_dir=gs://BUCKET/tensorflow_datasets \
        --config.data.tokenizer=$HOME/llama/tokenizer.model

Recipe: 4,096-token context, global batch 1,024 sequences (4M tokens) as 4 accumulated
micro-batches, AdamW (0.9, 0.95, eps 1e-5, weight decay 0.1), peak learning rate 3e-4, 2,000
warmup steps, cosine decay to 10%, clipping at 1.0, bfloat16 compute on float32 master
weights, full remat; 500,000 steps = 2T tokens.

Hardware: a v5p-128 slice (64 chips), fsdp over all chips. Expected result: the paper's
training curve (its Figure 5). Neither the TPU throughput nor the per-chip memory of this
config has been measured yet (the ahead-of-time fit check, llamax-aot, is a later issue).
Data: C4 English from tensorflow-datasets (`c4/en:3.1.0`, prepared once as ArrayRecord in
the data dir: `tfds build c4/en --file_format=array_record`), tokenized with Meta's Llama 2
`tokenizer.model`.
"""

from llamax.train import default_config


def get_config():
    c = default_config()
    c.model.preset = "llama2-7b"
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "full"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.data.source = "tfds"
    c.data.tfds_name = "c4/en:3.1.0"
    c.optimizer.learning_rate = 3e-4
    c.optimizer.warmup_steps = 2000
    c.train.steps = 500_000
    c.train.batch_size = 1024
    c.train.seq_len = 4096
    c.train.grad_accum_steps = 4
    c.train.log_every = 10
    c.train.eval_every = 1000
    c.train.eval_batches = 8
    return c
