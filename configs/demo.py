"""big-contrast train --config configs/demo.py --workdir workdir/demo

Tiny two towers on the built-in demo shapes; trains on a 2-core CPU in a few minutes.

Sigmoid (SigLIP) loss with the ring engine over 8 simulated devices (`make demo` sets
XLA_FLAGS). The argument is a comma-separated list: `configs/demo.py:softmax` trains the
CLIP loss instead, `:noeval` skips the evaluators (e.g. `configs/demo.py:softmax,noeval`);
`key=value` pairs override fields (`configs/demo.py:total_steps=50`). Zero-shot shape and
colour classification and image-text retrieval run on the demo eval split, which holds
all 48 colour-shape pairs, 6 of them never seen together in training.
"""

import ml_collections

from big_contrast.data import demo_class_names
from big_contrast.train import apply_arg, default_config, split_arg

FLAGS = ("sigmoid", "softmax", "noeval")


def eval_split(label_keys=()):
    return dict(sources={"demo": dict(kind="demo", split="eval", size=480, image_size=64)},
                label_keys=tuple(label_keys))


def get_config(arg=None):
    options, _ = split_arg(arg, FLAGS)
    loss = "softmax" if "softmax" in options else "sigmoid"
    config = default_config()
    config.seed = 0
    config.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
    config.batch_size = 128
    config.data.batch_size = config.get_ref("batch_size")
    config.data.sources.demo.size = 10_000  # examples in the train split (generated on the fly)
    config.total_steps = 600
    config.log_every = 50
    config.checkpoint_every = 200

    m = config.model
    m.loss = loss
    m.image.update(variant="mu/8", image_size=64, pool="gap", posemb="sincos2d")
    m.text.update(variant="mu", vocab_size=128, max_len=16, causal=loss == "softmax")
    m.embed_dim = 64

    config.optimizer.update(lr=3e-3, weight_decay=1e-4, warmup_steps=50, schedule="cosine")
    config.peak_flops_per_device = 20e9  # a rough share of a 2-core CPU; set your chip's peak

    config.evals = ml_collections.ConfigDict()
    if "noeval" in options:
        apply_arg(config, arg, flags=FLAGS)
        return config
    for task in ("shape", "colour"):
        config.evals[task] = dict(
            type="zero_shot", class_names=demo_class_names(task), templates=("a photo of a {}.",),
            label_field=f"label/{task}", batch_size=96, every_steps=200, data=eval_split([f"label/{task}"]))
    config.evals.retrieval = dict(type="retrieval", text_field="text", batch_size=96, every_steps=200,
                                  data=eval_split())
    apply_arg(config, arg, flags=FLAGS)
    return config
