"""Tiny: a few training steps on CPU in seconds, for tests and docs.

    llamax-train --config configs/tiny.py --workdir /tmp/llamax-tiny

Hardware: any CPU (8 simulated devices under `make`, or 1). Expected: 20 steps in well under
a minute; the loss falls from about 5.5 (log 256, the model's vocabulary) toward the Markov
chain's entropy rate (2.45 nats).
"""

from llamax.experiment import default_config


def get_config():
    c = default_config()
    c.task = "lm"
    c.model.preset = "tiny"
    c.mesh.fsdp = -1
    c.data.source = "markov"
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 5
    c.train.steps = 20
    c.train.batch_size = 8
    c.train.seq_len = 64
    c.train.log_every = 5
    c.train.eval_every = 10
    c.train.eval_batches = 2
    return c
