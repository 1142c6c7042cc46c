"""Parity at full size: transformers' default SiglipModel (B/16, 224 px, 64 tokens) and
CLIPModel (B/32, 224 px, 77 tokens) with random weights -> `interop.read` -> embeddings and
logits against transformers on the same pixels and token ids, float32 on CPU.

    PYTHONPATH=. JAX_PLATFORMS=cpu python experiments/interop_parity/run.py

The tests check the same at tiny sizes; this checks the real configs (default field names,
196 patches, 12 layers) and times the import. Prints a markdown table.
"""
import tempfile
import time

import jax
import numpy as np
import torch
import transformers
from flax import nnx

from big_contrast import interop

jax.config.update("jax_default_matmul_precision", "highest")


@nnx.jit
def forward(model, pixels, ids):
    return model(images=pixels, texts=ids)


def measure(name, model_class, config, eos_id=None):
    torch.manual_seed(0)
    reference = model_class(config).eval()
    directory = tempfile.mkdtemp()
    reference.save_pretrained(directory)
    start = time.perf_counter()
    model = interop.read(directory).model()
    import_s = time.perf_counter() - start
    size, length = config.vision_config.image_size, config.text_config.max_position_embeddings
    pixels = np.random.RandomState(0).randn(4, size, size, 3).astype(np.float32)
    ids = np.random.RandomState(1).randint(3, 1000, size=(4, length))
    if eos_id is not None:
        ids[:, length // 2] = eos_id
    with torch.no_grad():
        ref = reference(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)))
    out = forward(model, pixels, ids.astype(np.int32))

    def gap(ours, theirs):
        theirs = theirs.numpy() / np.linalg.norm(theirs.numpy(), axis=-1, keepdims=True)
        return float(np.max(1 - np.sum(np.asarray(ours, np.float64) * theirs, axis=-1)))

    logits = float(out.scale) * np.asarray(out.ztxt) @ np.asarray(out.zimg).T
    logits += 0.0 if out.bias is None else float(out.bias)
    diff = float(np.max(np.abs(logits - ref.logits_per_text.numpy())))
    params = sum(p.numel() for p in reference.parameters())
    print(f"| {name} | {params / 1e6:.1f} M | {gap(out.zimg, ref.image_embeds):.1e} | "
          f"{gap(out.ztxt, ref.text_embeds):.1e} | {diff:.1e} | {import_s:.1f} s |", flush=True)


if __name__ == "__main__":
    print("| model (random weights) | params | image 1 − cos | text 1 − cos | max logit diff | import |")
    print("|---|---:|---:|---:|---:|---:|")
    measure("SiglipModel B/16 224", transformers.SiglipModel, transformers.SiglipConfig())
    measure("CLIPModel B/32 224", transformers.CLIPModel, transformers.CLIPConfig(), eos_id=49407)
