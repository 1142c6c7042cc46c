"""big-contrast train --config configs/demo.py --workdir workdir/demo

Tiny two towers on the built-in demo shapes; trains on a 2-core CPU in about 4 minutes.

Softmax (CLIP) loss with the ring engine over the simulated devices (`make demo` sets
XLA_FLAGS to one device per core). The argument is a comma-separated list:
`configs/demo.py:sigmoid` trains the SigLIP loss instead, `:siglip2` the sigmoid loss with SigLIP 2's
captioning decoder (LocCa / CapPa, `siglip2()` below; README "SigLIP 2"), `:siglip2,locca` adds LocCa's
referring-expression and grounded-caption targets from the shapes' boxes (`locca()` below), `:naflex` feeds SigLIP 2's
NaFlex inputs (each crop at its own aspect ratio under a 16-patch budget, `naflex()` below;
README "Resolution"), `:self_distill` adds SigLIP 2's SILC + TIPS (`self_distillation()`
below; e.g. `configs/demo.py:siglip2,self_distill`), `:noeval` skips the evaluators (e.g.
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

FLAGS = ("sigmoid", "softmax", "noeval", "short_prompts", "siglip2", "locca", "naflex", "self_distill")
# One core of this machine's AVX-512 EPYC per simulated device: 2 FMA pipes x 8 f32 lanes x
# 2 flops x ~3 GHz. Set your chip's peak when you run elsewhere.
PEAK_FLOPS_PER_CORE = 100e9
IMAGE_SIZE = 32
PP_TRAIN = f"decode|random_resized_crop({IMAGE_SIZE}, scale=(0.6, 1.0), ratio=(0.9, 1.1))|value_range(-1, 1)"
PP_EVAL = f"decode|resize({IMAGE_SIZE})|value_range(-1, 1)"


def eval_split(label_keys=(), pairs="all", size=480, **source):
    return dict(sources={"demo": dict(kind="demo", split="eval", size=size, image_size=IMAGE_SIZE, pairs=pairs,
                                      **source)},
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
    if "locca" in options and "siglip2" not in options:
        raise ValueError("configs/demo.py: 'locca' adds targets to SigLIP 2's decoder; use 'siglip2,locca'")
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
    if "locca" in options:
        locca(config, every=0)
    if "self_distill" in options:
        self_distillation(config)
    if "noeval" in options:
        apply_arg(config, arg, flags=FLAGS)
        return with_teacher(config, options)
    every, prompts = 2000, "short" if "short_prompts" in options else "captions"
    config.evals.shape = zero_shot("shape", every, prompts)
    config.evals.colour = zero_shot("colour", every, prompts)
    config.evals.heldout = zero_shot("colour_shape", every, prompts, pairs="held_out", size=120)
    config.evals.retrieval = dict(type="retrieval", text_field="text", batch_size=96, every_steps=every,
                                  data=eval_split())
    if "siglip2" in options:
        siglip2(config, every)
    if "locca" in options:
        locca(config, every)
    apply_arg(config, arg, flags=FLAGS)
    return with_teacher(config, options)


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


LOCCA_BINS = 32  # one bin per pixel of the 32 px demo images (PaliGemma uses 1024)


def locca_targets(**task_weights):
    """`config.data.decoder_targets` of the demo: location tokens after the text tower's 128 ids."""
    return dict(num_bins=LOCCA_BINS, text_vocab_size=128, task_weights=task_weights or None)


def locca(config, every):
    """LocCa's three tasks at demo size: the demo source emits each shape's box with its phrase
    ("red circle"), each example draws captioning, referring expression or grounded captioning
    (equal odds), the decoder's vocabulary grows by the location and task tokens, and training
    resizes without cropping (boxes are fractions of the whole image). With `every` > 0 the
    captioning evaluator captions from the task token and a `referring` evaluator scores boxes."""
    from big_contrast.train.siglip2 import decoder_vocab_size

    config.data.sources.demo.boxes = True
    config.data.pp_train = PP_EVAL
    config.data.decoder_targets = locca_targets()
    config.model.decoder.vocab_size = decoder_vocab_size(config.data)
    if every:
        config.evals.captions.data = dict(eval_split(), decoder_targets=locca_targets(caption=1))
        config.evals.refer = dict(type="referring", num_bins=LOCCA_BINS, text_vocab_size=128, batch_size=96,
                                  every_steps=every, data=dict(eval_split(boxes=True),
                                                               decoder_targets=locca_targets(referring=1)))


def self_distillation(config):
    """SigLIP 2's SILC + TIPS at demo size (configs/siglip2_b16.py has the paper's recipe): a DINO
    head of 256 prototypes, 4 local crops of 16 px (2 x 2 patches) per 32 px image, both terms from
    80 % of training at the paper's base weights 1 and 0.25 (its B-size factor 0.25 not applied:
    the demo run's 20 % is short), half of the patches masked for TIPS."""
    config.model.distill_head = dict(hidden=128, bottleneck=32, prototypes=256)
    config.data.local_crops = dict(count=4, size=16, scale=(0.05, 0.4))
    config.self_distillation = dict(silc_weight=1.0, tips_weight=0.25, silc_start_fraction=0.8,
                                    tips_start_fraction=0.8, mask_ratio=0.5)


def with_teacher(config, options):
    """With `self_distill` and no `config.ema` given: the EMA teacher starts where the terms do (the
    paper initialises the teacher from the student there), from the final total_steps."""
    if "self_distill" in options and not config.ema:
        start = int(round(0.8 * config.total_steps))
        config.ema = dict(decay=0.99, start_step=start, every=1)
    return config
