"""big-contrast train --config configs/demo.py --workdir workdir/demo

Tiny two towers on the built-in demo shapes; trains on a 2-core CPU in about 4 minutes.

Softmax (CLIP) loss with the ring engine over the simulated devices (`make demo` sets
XLA_FLAGS to one device per core). The argument is a comma-separated list:
`configs/demo.py:sigmoid` trains the SigLIP loss instead, `:siglip2` the sigmoid loss with SigLIP 2's
captioning decoder (LocCa / CapPa, `siglip2()` below; README "SigLIP 2"), `:naflex` feeds SigLIP 2's
NaFlex inputs (each crop at its own aspect ratio under a 16-patch budget, `naflex()` below;
README "Resolution"), `:noeval` skips the evaluators (e.g.
`configs/demo.py:sigmoid,noeval`), `:short_prompts` evaluates with one short prompt per value
of the other attribute ("red {}", "green {}", ...); `key=value` pairs override fields
(`configs/demo.py:total_steps=50`). Zero-shot shape and colour classification and image-text
retrieval run on the demo eval split, which holds all 48 colour-shape pairs, 6 of them never
seen together in training; `heldout` classifies those 6 pairs' images among all 48 pairs.

The recipe, and why each choice, is measured in experiments/demo_recipe/README.md:
  * 32 px images cut into 8 px patches (a patch holds most of a shape) and a two-layer image
    tower of width 64: the tower can learn shape at all (supervised, 0.91 in 3,000 steps);
  * batches of groups of 5 images that share colour, size and position and differ in shape
    (`group_size=5`): once colour, size and position are learnt, almost no in-batch negative
    differs from its positive in shape alone, so without hard negatives shape is learnt slowly;
  * the softmax loss: with this recipe the sigmoid loss learns shape as well (0.87 in the lean
    trainer) but retrieves at recall@1 0.25, softmax at 0.59;
  * prompts that are the training captions with the class left open (`demo_templates`).
"""

import ml_collections

from big_contrast.data import demo_class_names, demo_templates
from big_contrast.train import apply_arg, default_config, split_arg

FLAGS = ("sigmoid", "softmax", "noeval", "short_prompts", "siglip2", "naflex")
# One core of this machine's AVX-512 EPYC per simulated device: 2 FMA pipes x 8 f32 lanes x
# 2 flops x ~3 GHz. Set your chip's peak when you run elsewhere.
PEAK_FLOPS_PER_CORE = 100e9
IMAGE_SIZE = 32
PP_TRAIN = f"decode|random_resized_crop({IMAGE_SIZE}, scale=(0.6, 1.0), ratio=(0.9, 1.1))|value_range(-1, 1)"
PP_EVAL = f"decode|resize({IMAGE_SIZE})|value_range(-1, 1)"


def eval_split(label_keys=(), pairs="all", size=480):
    return dict(sources={"demo": dict(kind="demo", split="eval", size=size, image_size=IMAGE_SIZE, pairs=pairs)},
                label_keys=tuple(label_keys))


def zero_shot(task, every, prompts="captions", **data):
    return dict(type="zero_shot", class_names=demo_class_names(task), templates=demo_templates(task, prompts),
                label_field=f"label/{task}", batch_size=96, every_steps=every,
                data=eval_split([f"label/{task}"], **data))


def get_config(arg=None):
    options, _ = split_arg(arg, FLAGS)
    if {"sigmoid", "softmax"} <= options:
        raise ValueError("configs/demo.py takes one of 'sigmoid' and 'softmax', not both")
    loss = "sigmoid" if options & {"sigmoid", "siglip2"} else "softmax"
    config = default_config()
    config.seed = 0
    config.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
    config.batch_size = 128
    config.data.batch_size = config.get_ref("batch_size")
    # Generated on the fly, in groups of 5 that differ in shape alone (hard negatives for shape).
    config.data.sources.demo.update(size=10_000, image_size=IMAGE_SIZE, group_size=5)
    config.data.pp_train, config.data.pp_eval = PP_TRAIN, PP_EVAL
    config.total_steps = 6000
    config.log_every = 100
    config.checkpoint_every = 1000

    m = config.model
    m.loss = loss
    # The study's recipe exactly (experiments/demo_recipe/run.py FINAL): MLPs 4x the width, 4 heads.
    m.image.update(variant="mu/8", image_size=IMAGE_SIZE, pool="gap", posemb="sincos2d", width=64,
                   depth=2, mlp_dim=256, num_heads=4)
    m.text.update(variant="mu", vocab_size=128, max_len=16, causal=loss == "softmax", num_heads=4)
    m.embed_dim = 64

    config.optimizer.update(lr=3e-3, weight_decay=1e-4, warmup_steps=50, schedule="cosine")
    config.peak_flops_per_device = PEAK_FLOPS_PER_CORE

    config.evals = ml_collections.ConfigDict()
    if "naflex" in options:
        naflex(config)
    if "siglip2" in options:
        siglip2(config, every=0)
    if "noeval" in options:
        apply_arg(config, arg, flags=FLAGS)
        return config
    every, prompts = 2000, "short" if "short_prompts" in options else "captions"
    config.evals.shape = zero_shot("shape", every, prompts)
    config.evals.colour = zero_shot("colour", every, prompts)
    config.evals.heldout = zero_shot("colour_shape", every, prompts, pairs="held_out", size=120)
    config.evals.retrieval = dict(type="retrieval", text_field="text", batch_size=96, every_steps=every,
                                  data=eval_split())
    if "siglip2" in options:
        siglip2(config, every)
    apply_arg(config, arg, flags=FLAGS)
    return config


def naflex(config):
    """SigLIP 2's NaFlex at demo size: a random window of the image at its own aspect ratio (1:2 to
    2:1), resized to keep it under 16 patches of 8 px (mixed patch grids in every batch); eval
    images are square, so 4 x 4 patches, the fixed-resolution input. The image tower keeps its
    parameters; NaFlex resamples a learned position table per image, so posemb='learn'."""
    config.model.image.posemb = "learn"
    config.data.pp_train = ("decode|random_resized_crop(None, scale=(0.6, 1.0), ratio=(0.5, 2.0))"
                            "|naflex(patch_size=8, max_num_patches=16)")
    config.data.pp_eval = "decode|naflex(patch_size=8, max_num_patches=16)"


def siglip2(config, every):
    """SigLIP 2's captioning decoder at demo size (configs/siglip2_b16.py has the paper's recipe): a
    one-block decoder of width 64 on the 4 x 4 patch tokens, CapPa's parallel prediction on half of
    the rows, the captioning loss at weight 1; with `every` > 0 an evaluator of greedy captions."""
    config.model.decoder = dict(width=64, depth=1, num_heads=4, mlp_dim=256, parallel_fraction=0.5)
    config.caption_loss_weight = 1.0
    if every:
        config.evals.captions = dict(type="captioning", text_field="text", length=config.data.max_len,
                                     batch_size=96, every_steps=every, data=eval_split(),
                                     names=dict(colour=demo_class_names("colour"), shape=demo_class_names("shape")))
