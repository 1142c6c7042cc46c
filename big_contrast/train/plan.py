"""The memory model of a train step: sizes and per-device memory of a config, without running it
(what `big-contrast plan` prints; `commands/plan.py`).

* parameters per tower (exact, from the abstract model);
* per-device bytes of parameters, gradients and AdamW moments, from the sharding rules applied
  to the config's mesh (its -1 entry resolved against `num_devices`);
* under gradient caching with FSDP-sharded parameters, the full copy each device gathers once
  per pass (`train/step.py`) and that copy's micro-batch gradient before its reduce-scatter;
* activation memory per example of a micro-batch, from XLA's memory analysis of the compiled
  tower forward+backward at two micro-batch sizes on one device (the slope of the line); a
  NaFlex run (pp_train ending in naflex(...)) is measured at its budget, max_num_patches tokens;
* the loss engine's per-device memory: the ring's measured bound, 5 * b * D * 4 bytes plus
  its tiles of `ring.default_block()` on this backend unless `config.loss_block` says
  (experiments/loss_scaling), or b * B logits for the all-gather and dense schemes;
* SigLIP 2's SILC / TIPS (`train/self_distill.py`): the local crops' and the masked view's tower
  passes and the distill heads in the activations per example, the teacher's forward with them
  (it runs a micro-batch at a time, before the student's passes), and the teacher's targets of the
  device's rows (b x (1 + P) x K floats, with its scores) as fixed bytes;
* the largest micro-batch (a divisor of the per-device batch) that fits `device_memory_bytes`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from big_contrast import models, sharding
from big_contrast.losses import ring
from big_contrast.train import naflex as train_naflex
from big_contrast.train import self_distill, siglip2
from big_contrast.train import teacher as train_teacher  # issue 23: a frozen teacher's params + activations

GIB = 2**30


def mesh_shape(config, num_devices) -> dict[str, int]:
    """`config.mesh` with its -1 entry resolved against `num_devices`."""
    pairs = [(name, int(size)) for name, size in config.mesh]
    known = math.prod(size for _, size in pairs if size != -1)
    return {name: (num_devices // known if size == -1 else size) for name, size in pairs}


def _per_device_bytes(abstract_state, mesh_shape) -> int:
    total = 0
    for _, variable in nnx.to_flat_state(abstract_state):
        value = variable.get_value()
        axes = sharding.variable_logical_axes(variable)
        spec = sharding.logical_to_spec(axes, value.shape, mesh_shape) if axes else ()
        shard = list(value.shape)
        for dim, entry in enumerate(spec):
            if entry is not None:
                names = (entry,) if isinstance(entry, str) else entry
                shard[dim] //= math.prod(mesh_shape[n] for n in names)
        total += math.prod(shard) * value.dtype.itemsize
    return total


def _activation_bytes_per_example(config, abstract) -> int:
    """Slope of the compiled towers' temporary memory between micro-batches of 1 and 2."""
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    m = config.model
    size = m.image.image_size
    h, w = (size, size) if isinstance(size, int) else size

    def towers(p, images, tokens):
        model = nnx.merge(graphdef, p, rest)
        if model.decoder is not None:  # SigLIP 2: the decoder's activations count too (train/siglip2.py)
            zimg, ztxt, sums = siglip2.Terms(caption_weight=1.0).embed(model, images, tokens, None)
            value = jnp.sum(zimg * ztxt) + sum(s.sum() for s in sums.values())
        else:
            value = jnp.sum(model.embed_images(images) * model.embed_texts(tokens))
        return value + self_distill.activation_probe(config, model, images)  # SILC / TIPS: crops, heads, teacher

    temps = []
    for micro in (1, 2):
        images = (train_naflex.abstract_images(config, micro)  # NaFlex: sequence = max_num_patches (issue 22)
                  or jax.ShapeDtypeStruct((micro, h, w, m.image.channels), jnp.float32))
        tokens = jax.ShapeDtypeStruct((micro, m.text.max_len), jnp.int32)
        compiled = jax.jit(jax.grad(towers)).lower(params, images, tokens).compile()
        temps.append(compiled.memory_analysis().temp_size_in_bytes)
    return max(temps[1] - temps[0], 1)


def _gathered_param_bytes(abstract, mesh_shape, param_bytes) -> int:
    """Per-device bytes of the parameters once gathered over the batch axes (0 when they are not
    sharded over them): what a device holds while it loops over its micro-batches."""
    unsharded = {name: 1 if name in sharding.BATCH_AXES else size for name, size in mesh_shape.items()}
    full = _per_device_bytes(nnx.state(abstract, nnx.Param), unsharded)
    return full if full > param_bytes else 0


def plan(config, *, device_memory_bytes: int, num_devices: int | None = None) -> dict:
    num_devices = num_devices or jax.device_count()
    shape = mesh_shape(config, num_devices)
    n_shards = math.prod(shape.get(a, 1) for a in sharding.BATCH_AXES)
    abstract = models.abstract_model(config.model)
    counts = models.count_params(abstract)
    param_bytes = _per_device_bytes(nnx.state(abstract, nnx.Param), shape)
    per_device_batch = config.batch_size // n_shards
    dim = abstract.embed_dim
    if config.loss_impl == "ring":
        block = min(config.loss_block or ring.default_block(), per_device_batch)
        loss_bytes = 5 * per_device_batch * dim * 4 + 8 * block * block * 4
    else:
        loss_bytes = 3 * per_device_batch * config.batch_size * 4
    per_example = _activation_bytes_per_example(config, abstract)
    micro = config.microbatch_size or per_device_batch
    gathered = _gathered_param_bytes(abstract, shape, param_bytes) if micro < per_device_batch else 0
    fixed = 4 * param_bytes + 2 * gathered + loss_bytes + 4 * per_device_batch * dim * 4  # params, grads, 2 moments
    ema_bytes, teacher_bytes = _ema_and_teacher_bytes(config, param_bytes, per_device_batch, dim)
    fixed += ema_bytes + teacher_bytes
    targets_bytes = self_distill.target_bytes(config, per_device_batch)  # SILC / TIPS: the teacher's targets
    frozen = train_teacher.plan_entries(config, shape, micro, _per_device_bytes)  # {} without one
    fixed += targets_bytes + frozen.get("teacher_param_bytes", 0) + frozen.get("teacher_activation_bytes", 0)
    room = device_memory_bytes - fixed
    fitting = [d for d in range(1, per_device_batch + 1) if per_device_batch % d == 0 and d * per_example <= room]
    return dict(
        mesh=shape, devices=num_devices, params=counts, batch=config.batch_size,
        per_device_batch=per_device_batch, embed_dim=dim, param_bytes=param_bytes, grad_bytes=param_bytes,
        optimizer_bytes=2 * param_bytes, gathered_param_bytes=gathered, activation_bytes_per_example=per_example,
        activation_bytes_per_microbatch=micro * per_example, microbatch=micro, loss_impl=config.loss_impl,
        loss_bytes=loss_bytes, device_memory_bytes=device_memory_bytes,
        largest_fitting_microbatch=max(fitting) if fitting else None,
        ema_bytes=ema_bytes, teacher_bytes=teacher_bytes, image_sequence=_image_sequence(config),
        self_distill_target_bytes=targets_bytes, **frozen,
    )


def _image_sequence(config) -> str:
    """The image tower's input: fixed-size images, or NaFlex's patch budget (issue 22)."""
    options = train_naflex.pp_options(config)
    if options is None:
        size = config.model.image.image_size
        h, w = (size, size) if isinstance(size, int) else size
        return f"{h}x{w} px images"
    p = options["patch_size"]
    return f"NaFlex, {options['max_num_patches']} patches of {p}x{p} px"


def _ema_and_teacher_bytes(config, param_bytes, per_device_batch, dim) -> tuple[int, int]:
    """The EMA's copy of the parameters (sharded like them), and a momentum teacher's image and
    text embeddings of the device's rows plus the step's cotangent-free copies (its forward pass
    runs a micro-batch at a time, without activations kept, inside the student's budget)."""
    ema = param_bytes if config.get("ema") else 0
    teacher = 2 * per_device_batch * dim * 4 if config.get("teacher") else 0
    return ema, teacher


def format_plan(p: dict) -> str:
    gib = lambda b: f"{b / 2**20:>12,.1f} MiB"  # noqa: E731
    fit = p["largest_fitting_microbatch"]
    lines = [
        f"mesh {p['mesh']} ({p['devices']} devices); global batch {p['batch']:,} = {p['per_device_batch']:,} per device",
        f"parameters: image {p['params']['image']:,}  text {p['params']['text']:,}"
        + (f"  decoder {p['params']['decoder']:,}" if "decoder" in p["params"] else "")
        + (f"  distill head {p['params']['distill_head']:,}" if "distill_head" in p["params"] else "") + f"  total {p['params']['total']:,}",
        *([f"image input: {p['image_sequence']}"] if p.get("image_sequence") else []),
        "per-device memory:",
        f"  parameters                     {gib(p['param_bytes'])}",
        f"  gradients                      {gib(p['grad_bytes'])}",
        f"  AdamW moments                  {gib(p['optimizer_bytes'])}",
        *([f"  EMA of the parameters          {gib(p['ema_bytes'])}"] if p.get("ema_bytes") else []),
        *([f"  teacher embeddings             {gib(p['teacher_bytes'])}"] if p.get("teacher_bytes") else []),
        *([f"  SILC / TIPS teacher targets    {gib(p['self_distill_target_bytes'])}"]
          if p.get("self_distill_target_bytes") else []),
        *([f"  frozen teacher ({p['teacher_params']:,} params) {gib(p['teacher_param_bytes'])}",
           f"  teacher forward, micro-batch   {gib(p['teacher_activation_bytes'])}"] if "teacher_params" in p else []),
        *([f"  gathered parameters + grads    {gib(2 * p['gathered_param_bytes'])}"] if p["gathered_param_bytes"] else []),
        f"  activations / example          {gib(p['activation_bytes_per_example'])}",
        f"  activations, micro-batch {p['microbatch']:<6,}{gib(p['activation_bytes_per_microbatch'])}",
        f"  loss engine ({p['loss_impl']:<10})      {gib(p['loss_bytes'])}",
        f"largest micro-batch that fits {p['device_memory_bytes'] / GIB:g} GiB: "
        + (f"{fit:,} per device (config.microbatch_size={fit})" if fit else "none: shard the parameters over more devices"),
    ]
    return "\n".join(lines)
