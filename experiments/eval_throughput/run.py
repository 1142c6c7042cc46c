"""Is scoring ever the bottleneck of zero-shot / retrieval evaluation?

    PYTHONPATH=. JAX_PLATFORMS=cpu .venv/bin/python experiments/eval_throughput/run.py [--json out.json]

Measures, on this machine:
1. images/s of a whole zero-shot evaluation (towers + classifier + scoring) with the demo's tiny
   towers (mu/8 at 64 px), 2,048 images x 10 classes x 80 templates;
2. the scoring part alone (no towers, random unit embeddings, D = 512):
   - zero-shot: classifier from 1,000 classes x 80 templates of prompt embeddings, then top-1/5 of
     50,000 images (`classifier_from_prompt_embeddings` + `topk_accuracy`);
   - retrieval: recall@{1,5,10} both ways for 5,000 images x 25,000 captions (`recall_at_k`);
3. the towers those numbers must be compared with: ViT-B/16 at 224 px (and the B text tower at
   64 tokens) FLOPs per example from XLA's cost analysis of the compiled embed functions, the
   measured time of the B/16 image tower on a small batch, and the f32 matmul rate here.
The ratio scoring / (embedding the same images with B/16) is the figure the issue bounds (<= 5 %).
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from big_contrast import evaluate, models
from big_contrast.evaluate.retrieval import recall_at_k
from big_contrast.evaluate.zero_shot import classifier_from_prompt_embeddings, topk_accuracy


def best_time(fn, repeats=3):
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def unit(rng, shape):
    z = rng.normal(size=shape).astype(np.float32)
    return z / np.linalg.norm(z, axis=-1, keepdims=True)


def byte_tokens(texts, length=16):
    """Prompt bytes as token ids 3..127 (the tiny text tower's vocabulary), zero-padded to `length`."""
    tokens = np.zeros((len(texts), length), np.int32)
    for i, text in enumerate(texts):
        ids = np.frombuffer(text.encode()[:length - 1], np.uint8) % 125 + 3
        tokens[i, :len(ids)] = ids
    return tokens


def tiny_zero_shot_rate(n_images=2048, n_classes=10):
    cfg = dict(image=dict(variant="mu/8", image_size=64, pool="gap", posemb="sincos2d"),
               text=dict(variant="mu", vocab_size=128, max_len=16), embed_dim=64)
    graphdef, state = nnx.split(models.create(cfg, nnx.Rngs(0)))
    embed_images = jax.jit(lambda s, x: nnx.merge(graphdef, s).embed_images(x))
    embed_texts = jax.jit(lambda s, t: nnx.merge(graphdef, s).embed_texts(t))
    encoders = evaluate.Encoders(lambda x: embed_images(state, x), lambda t: embed_texts(state, t), byte_tokens)
    class_names = [f"class {i}" for i in range(n_classes)]
    evaluator = evaluate.build_evaluator("zs", dict(type="zero_shot", class_names=class_names, templates="imagenet80",
                                                    batch_size=256))
    rng = np.random.default_rng(0)
    data = {"image": rng.uniform(-1, 1, (n_images, 64, 64, 3)).astype(np.float32),
            "label": rng.integers(0, n_classes, n_images)}
    seconds = best_time(lambda: evaluator.run(data, encoders), repeats=2)
    return {"tiny_zero_shot_images": n_images, "tiny_zero_shot_s": seconds,
            "tiny_zero_shot_images_per_s": n_images / seconds}


def scoring_times(dim=512):
    rng = np.random.default_rng(0)
    prompts = unit(rng, (1000, 80, dim))
    zimg = unit(rng, (50_000, dim))
    labels = rng.integers(0, 1000, 50_000)
    zero_shot_s = best_time(lambda: topk_accuracy(zimg, classifier_from_prompt_embeddings(prompts), labels, (1, 5)))
    zimg5k, ztxt = unit(rng, (5_000, dim)), unit(rng, (25_000, dim))
    img_of_txt = np.repeat(np.arange(5_000), 5)
    retrieval_s = best_time(lambda: recall_at_k(zimg5k, ztxt, img_of_txt, (1, 5, 10)))
    return {"scoring_zero_shot_50k_x_1000x80_s": zero_shot_s, "scoring_retrieval_5k_x_25k_s": retrieval_s}


def matmul_rate(n=2048):
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    return 2 * n ** 3 / best_time(lambda: f(a).block_until_ready())


def flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis["flops"])


def b16_towers(measure_batch=4):
    """FLOPs per example of ViT-B/16 @ 224 and the B text tower @ 64 tokens (XLA cost analysis),
    and the measured seconds per image of the B/16 image tower here."""
    cfg = models.default_model_config()  # B/16 at 224 px, B text at 64 tokens
    abstract = models.abstract_model(cfg)
    graphdef, state = nnx.split(abstract)
    embed_images = jax.jit(lambda s, x: nnx.merge(graphdef, s).embed_images(x))
    embed_texts = jax.jit(lambda s, t: nnx.merge(graphdef, s).embed_texts(t))
    batch = 64
    image_spec = jax.ShapeDtypeStruct((batch, 224, 224, 3), jnp.float32)
    image_flops = flops(embed_images.lower(state, image_spec).compile()) / batch
    text_flops = flops(embed_texts.lower(state, jax.ShapeDtypeStruct((batch, 64), jnp.int32)).compile()) / batch
    model = models.create(cfg, nnx.Rngs(0))
    _, real_state = nnx.split(model)
    images = jnp.zeros((measure_batch, 224, 224, 3), jnp.float32)
    seconds = best_time(lambda: embed_images(real_state, images).block_until_ready(), repeats=2) / measure_batch
    return {"b16_image_gflops_per_image": image_flops / 1e9, "b_text_gflops_per_text": text_flops / 1e9,
            "b16_image_s_per_image_measured": seconds}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = {"devices": str(jax.devices()[0].device_kind), "matmul_f32_gflops": matmul_rate() / 1e9}
    results.update(tiny_zero_shot_rate())
    results.update(scoring_times())
    results.update(b16_towers())
    rate = results["matmul_f32_gflops"] * 1e9
    per_image = results["b16_image_s_per_image_measured"]
    results["b16_embed_50k_images_s_measured"] = 50_000 * per_image
    results["b16_embed_5k_images_s_measured"] = 5_000 * per_image
    results["b16_embed_50k_images_s_from_flops"] = 50_000 * results["b16_image_gflops_per_image"] * 1e9 / rate
    results["zero_shot_scoring_fraction"] = (results["scoring_zero_shot_50k_x_1000x80_s"]
                                             / results["b16_embed_50k_images_s_measured"])
    results["retrieval_scoring_fraction"] = (results["scoring_retrieval_5k_x_25k_s"]
                                             / results["b16_embed_5k_images_s_measured"])
    for key, value in results.items():
        print(f"{key:42s} {value:.4g}" if isinstance(value, float) else f"{key:42s} {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
