"""DreamBooth experts: per-subject fine-tunes of a text-to-image UNet (the SuTI teachers).

Experts for several subjects train at once as one vmapped step over a stack of
per-subject parameter copies; each expert then renders its subject in new prompts.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, NamedTuple, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from suti_jax.config import DiffusionConfig, OptimizerConfig, SamplingConfig, UNetConfig
from suti_jax.diffusion import loss as loss_lib
from suti_jax.diffusion import sampling
from suti_jax.diffusion.schedule import make_schedule
from suti_jax.models.text import TextEncoder
from suti_jax.models.unet import UNet
from suti_jax.train.optimizer import make_optimizer

Params = Any


@dataclasses.dataclass(frozen=True)
class ExpertConfig:
  """How one DreamBooth expert is fine-tuned (defaults: SuTI's experts).

  Attributes:
    num_steps: optimisation steps per expert (SuTI: 500).
    optimizer: 'adafactor', 'adam' or 'adamw' (SuTI: Adafactor).
    learning_rate: constant step size (SuTI: 1e-5).
    clip_norm: global gradient-norm clip; 0 disables it.
    batch_size: subject images per step; as many class images join them.
    prior_loss_weight: lambda of the class prior-preservation loss (DreamBooth: 1).
    num_class_images: images the frozen model generates per class noun, once
      (DreamBooth: ~1000).
    class_sampling_steps: sampler steps for those class images.
    class_guidance_scale: CFG scale for the class images.
    identifier: the rare token that names the subject ("a sks dog").
    max_parallel_experts: experts vmapped in one step (bounded by memory: each
      holds a parameter and optimizer-state copy). On CPU 1 is fastest: vmapped
      experts turn each convolution into one over per-expert kernels, which
      XLA:CPU runs about half as fast (configs/demo.py).
    max_instance_images: subject images are zero-padded to at least this many
      slots, so subjects with 3, 4 or 5 images share one compiled step.
    render_guidance_scale: CFG scale of the expert's renders; None keeps the
      base stage's sampling config. A fine-tuned expert drifts from the prompt
      towards its instance images, and a stronger text guidance pulls it back.
    instance_captions: train each subject image on its own caption with the
      subject phrase replaced by the identifier ('a sks badge on the beach')
      instead of DreamBooth's one 'a sks badge' for all. The caption explains
      the image's context, so the identifier binds to the subject alone and
      the expert follows new contexts (`instance_prompts`).
    render_base_text_guidance: weight of the base model's text direction in the
      expert's renders (`render`'s `base_text_guidance`); 0 renders with the
      expert alone.
  """

  num_steps: int = 500
  optimizer: str = "adafactor"
  learning_rate: float = 1e-5
  clip_norm: float = 1.0
  batch_size: int = 4
  prior_loss_weight: float = 1.0
  num_class_images: int = 1000
  class_sampling_steps: int = 50
  class_guidance_scale: float = 1.35
  identifier: str = "sks"
  max_parallel_experts: int = 8
  max_instance_images: int = 5
  render_guidance_scale: float | None = None
  instance_captions: bool = False
  render_base_text_guidance: float = 0.0

  @classmethod
  def tiny(cls) -> ExpertConfig:
    """Scaled for tiny CPU models (configs/imagen_base64.py:tiny, 16 px, 0.78M params).

    Measured in tests/test_dreambooth.py: 40 Adam steps at lr 1e-3 already cut a
    subject's denoising loss 6.3x (1.28 -> 0.20); the paper's lr 1e-5 barely
    moves a tiny model in a CPU budget. 150 steps leave room for real subjects.
    """
    return cls(num_steps=150, optimizer="adam", learning_rate=1e-3, batch_size=4,
               num_class_images=8, class_sampling_steps=8, max_parallel_experts=4)

  def render_sampling(self, sampling_cfg: SamplingConfig) -> SamplingConfig:
    """The base stage's sampling config with this recipe's render guidance."""
    if self.render_guidance_scale is None:
      return sampling_cfg
    return dataclasses.replace(sampling_cfg, guidance_scale=self.render_guidance_scale)

  def render_options(self, base_params: Params) -> dict[str, Any]:
    """`render`'s keyword arguments for this recipe's base guidance."""
    return dict(base_params=base_params, base_text_guidance=self.render_base_text_guidance,
                identifier=self.identifier)

  def instance_prompts(self, class_noun: str, num_images: int,
                       captions: Sequence[str] | None = None,
                       subject_phrase: str = "") -> list[str]:
    """The training prompt of each of a subject's `num_images` images.

    Args:
      class_noun: the subject's class noun.
      num_images: the subject's images.
      captions: each image's caption; needed with `instance_captions`.
      subject_phrase: how the captions name the subject (`identifier_prompt`).

    Returns:
      `num_images` prompts: the identifier captions with `instance_captions`,
      else 'a sks <class noun>' for every image.
    """
    if not self.instance_captions:
      return [instance_prompt(class_noun, self.identifier)] * num_images
    if captions is None or len(captions) != num_images or not subject_phrase:
      got = "no captions" if captions is None else f"{len(captions)} captions"
      raise ValueError(f"ExpertConfig.instance_captions needs one caption per image and the "
                       f"subject phrase; got {got} for {num_images} images of "
                       f"'{class_noun}' (subject phrase {subject_phrase!r})")
    return [identifier_prompt(c, subject_phrase, class_noun, self.identifier)
            for c in captions]

  def optimizer_config(self) -> OptimizerConfig:
    """The optax recipe as the trainer's OptimizerConfig (no warmup, no EMA)."""
    return OptimizerConfig(name=self.optimizer, learning_rate=self.learning_rate,
                           warmup_steps=0, clip_norm=self.clip_norm)


def instance_prompt(class_noun: str, identifier: str = "sks") -> str:
  """DreamBooth's training prompt for the subject images: 'a sks <class noun>'."""
  return f"a {identifier} {class_noun}"


def class_prompt(class_noun: str) -> str:
  """The prior-preservation prompt: 'a <class noun>'."""
  return f"a {class_noun}"


def identifier_prompt(prompt: str, subject_phrase: str, class_noun: str,
                      identifier: str = "sks") -> str:
  """The prompt an expert renders: the subject phrase replaced by 'sks <class noun>'.

  The rule: the first whole-word occurrence of `subject_phrase` (case-insensitive)
  in `prompt` becomes '<identifier> <class noun>'; articles around it are kept, so
  'a red owl on the beach' with phrase 'red owl' -> 'a sks owl on the beach'. A
  prompt without the phrase gets ', sks <class noun>' appended rather than losing
  its subject.

  Args:
    prompt: the pipeline's prompt for a target.
    subject_phrase: how the prompt names the subject.
    class_noun: the subject's class noun.
    identifier: the rare token.

  Returns:
    The identifier prompt.
  """
  token = f"{identifier} {class_noun}"
  pattern = re.compile(rf"\b{re.escape(subject_phrase)}\b", re.IGNORECASE)
  replaced, count = pattern.subn(token, prompt, count=1)
  return replaced if count else f"{prompt}, {token}"


def to_uint8(images: jax.Array | np.ndarray) -> np.ndarray:
  """float [-1, 1] -> uint8 [0, 255]."""
  x = (np.asarray(images, np.float32) + 1.0) * 127.5
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def to_float(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return np.asarray(images, np.float32) / 127.5 - 1.0


class _BaseGuide(NamedTuple):
  """The base model's text direction added to an expert's render.

  Attributes:
    params: the base UNet's params (unboxed).
    text_emb / text_mask: [2N, L, D] / [2N, L]: the N prompts with the class noun
      in place of the identifier, then N plain class prompts.
    scale: weight of base(prompt) - base(class prompt) in the guided output.
  """

  params: Params
  text_emb: jax.Array
  text_mask: jax.Array
  scale: jax.Array


@functools.partial(jax.jit, static_argnames=("unet_cfg", "diffusion_cfg", "sampling_cfg"))
def _sample(params: Params, text_emb: jax.Array, text_mask: jax.Array, key: jax.Array,
            base_guide: _BaseGuide | None = None, *, unet_cfg: UNetConfig,
            diffusion_cfg: DiffusionConfig, sampling_cfg: SamplingConfig) -> jax.Array:
  """Samples one image per text [N, L, D]; float [N, H, W, C] in [-1, 1]."""
  model = UNet(unet_cfg)

  def predict_fn(x_t, log_snr, text, exemplars):
    del exemplars  # A plain text-to-image model.
    mask = text_mask if text else jnp.zeros_like(text_mask)
    out = model.apply({"params": params}, x_t, log_snr, text_emb, mask)
    if text and base_guide is not None:
      # CFG scales the conditional output's difference from the unconditional
      # one by the guidance scale: the base term is divided by it here, so that
      # the sample moves by `scale` times the base's text direction.
      pair = model.apply({"params": base_guide.params}, jnp.concatenate([x_t, x_t]),
                         jnp.concatenate([log_snr, log_snr]), base_guide.text_emb,
                         base_guide.text_mask)
      with_prompt, plain = jnp.split(pair, 2)
      out = out + base_guide.scale / sampling_cfg.guidance_scale * (with_prompt - plain)
    return out

  size = unet_cfg.image_size
  shape = (text_emb.shape[0], size, size, unet_cfg.out_channels)
  return sampling.sample(predict_fn, shape, key, make_schedule(diffusion_cfg), sampling_cfg,
                         diffusion_cfg.prediction)


def class_prompts(prompts: Sequence[str], identifier: str = "sks") -> tuple[list[str], list[str]]:
  """Identifier prompts in the base model's words: ('a sks box on a beach', ...) ->
  (['a box on a beach', ...], ['a box', ...]), the prompt with the identifier
  dropped and the plain class prompt.

  Raises:
    ValueError: a prompt without '<identifier> <class noun>', naming it.
  """
  pattern = re.compile(rf"\b{re.escape(identifier)} (\S+)")
  with_prompt, plain = [], []
  for prompt in prompts:
    match = pattern.search(prompt)
    if match is None:
      raise ValueError(f"expert prompt {prompt!r} does not name the subject as "
                       f"'{identifier} <class noun>'")
    with_prompt.append(prompt[:match.start()] + match.group(1) + prompt[match.end():])
    plain.append(class_prompt(match.group(1).strip(",.")))
  return with_prompt, plain


def render(expert_params: Params, prompts: Sequence[str], key: jax.Array,
           sampling_cfg: SamplingConfig, *, text_encoder: TextEncoder,
           unet_cfg: UNetConfig, diffusion_cfg: DiffusionConfig,
           base_params: Params | None = None, base_text_guidance: float = 0.0,
           identifier: str = "sks") -> np.ndarray:
  """Samples one image per prompt: an expert's subject, or the base model's output.

  Args:
    expert_params: UNet params (boxed or not) of an expert or the base model.
    prompts: N prompts; for an expert, identifier prompts (`identifier_prompt`).
    key: PRNG key.
    sampling_cfg: sampler, steps and guidance ('cfg').
    text_encoder: the frozen text encoder the UNet was trained with.
    unet_cfg: the UNet's config.
    diffusion_cfg: schedule and prediction type.
    base_params: the base model the expert was fine-tuned from; with
      `base_text_guidance` > 0 the guided output gains base_text_guidance x
      (base(prompt) - base(plain class prompt)), the prompts taken in the base's
      words (`class_prompts`): the base still follows the prompt's modifiers
      that a fine-tuned expert drifts away from (composable diffusion, Liu et
      al. 2022). Costs two base evaluations per conditional one.
    base_text_guidance: that weight; 0 renders with the expert alone.
    identifier: the rare token of the prompts (for `class_prompts`).

  Returns:
    uint8 [N, H, W, 3].
  """
  # Batches are padded to a power of two (repeating the last prompt), so a
  # stream of varying prompt counts compiles the sampler a few times, not once
  # per count.
  padded = list(prompts) + [prompts[-1]] * (_bucket(len(prompts)) - len(prompts))
  emb, mask = text_encoder.encode(padded)
  base_guide = None
  if base_text_guidance:
    if base_params is None:
      raise ValueError("render: base_text_guidance needs base_params")
    if sampling_cfg.guidance_scale <= 0:
      raise ValueError(f"render: base_text_guidance needs a positive guidance_scale, got "
                       f"{sampling_cfg.guidance_scale}")
    with_prompt, plain = class_prompts(padded, identifier)
    base_emb, base_mask = text_encoder.encode(with_prompt + plain)
    base_guide = _BaseGuide(nn.unbox(base_params), base_emb, base_mask,
                            jnp.float32(base_text_guidance))
  images = _sample(nn.unbox(expert_params), emb, mask, key, base_guide, unet_cfg=unet_cfg,
                   diffusion_cfg=diffusion_cfg, sampling_cfg=sampling_cfg)
  return to_uint8(images[:len(prompts)])


def _bucket(n: int) -> int:
  """The smallest power of two >= n."""
  return 1 << max(0, n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class _StepStatics:
  """What the expert step depends on statically (hashable, jit-static); the step
  count and chunking are left out so that they never force a recompile."""

  unet_cfg: UNetConfig
  diffusion_cfg: DiffusionConfig
  optimizer_cfg: OptimizerConfig
  batch_size: int
  prior_loss_weight: float

  @classmethod
  def of(cls, unet_cfg: UNetConfig, diffusion_cfg: DiffusionConfig,
         cfg: ExpertConfig) -> _StepStatics:
    return cls(unet_cfg, diffusion_cfg, cfg.optimizer_config(), cfg.batch_size,
               cfg.prior_loss_weight)


def _expert_loss(params: Params, batch: dict[str, jax.Array], key: jax.Array,
                 statics: _StepStatics) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DreamBooth loss of one expert: instance loss + lambda * prior loss.

  Subject and class examples go through the UNet as one concatenated batch.

  Args:
    params: one expert's UNet params.
    batch: 'instance' [B, H, W, 3] images with their prompts' 'instance_emb'
      [B, L, D] and 'instance_mask' [B, L]; 'class' [B, H, W, 3] images and
      the one class prompt's 'class_emb' [L, D] with its mask [L].
    key: PRNG key for t and eps.
    statics: configs.

  Returns:
    (scalar loss, {'instance_loss', 'prior_loss'}).
  """
  b = batch["instance"].shape[0]
  x0 = jnp.concatenate([batch["instance"], batch["class"]])
  emb = jnp.concatenate([batch["instance_emb"],
                         einops.repeat(batch["class_emb"], "l d -> b l d", b=b)])
  mask = jnp.concatenate([batch["instance_mask"],
                          einops.repeat(batch["class_mask"], "l -> b l", b=b)])
  model = UNet(statics.unet_cfg)

  def predict_fn(x_t, log_snr):
    return model.apply({"params": params}, x_t, log_snr, emb, mask)

  per_example, _ = loss_lib.denoising_loss(
      predict_fn, x0, key, make_schedule(statics.diffusion_cfg), statics.diffusion_cfg)
  instance_loss = jnp.mean(per_example[:b])
  prior_loss = jnp.mean(per_example[b:])
  total = instance_loss + statics.prior_loss_weight * prior_loss
  return total, {"instance_loss": instance_loss, "prior_loss": prior_loss}


def _draw_batch(data: dict[str, jax.Array], key: jax.Array, batch_size: int
                ) -> dict[str, jax.Array]:
  """Random subject images (with their prompts) and class images for one expert's
  step (with replacement)."""
  inst_key, cls_key = jax.random.split(key)
  # Subjects have 1..K_max real images; padded slots are never drawn.
  inst_idx = jax.random.randint(inst_key, (batch_size,), 0, data["num_instance"])
  cls_idx = jax.random.randint(cls_key, (batch_size,), 0, data["class_images"].shape[0])
  return dict(instance=data["instance_images"][inst_idx],
              **{"class": data["class_images"][cls_idx]},
              instance_emb=data["instance_emb"][inst_idx],
              instance_mask=data["instance_mask"][inst_idx],
              class_emb=data["class_emb"], class_mask=data["class_mask"])


@functools.partial(jax.jit, static_argnames=("statics",), donate_argnums=(0, 1))
def _train_step(params: Params, opt_state: Any, data: dict[str, jax.Array],
                keys: jax.Array, step: jax.Array, *, statics: _StepStatics
                ) -> tuple[Params, Any, dict[str, jax.Array]]:
  """One optimisation step of a stack of S experts (every array has a leading S).

  Experts are independent, so the step is vmapped: S small fine-tunes become one
  batched computation (one compile, one dispatch per step), and the result equals
  S separate fine-tunes.
  """
  tx = make_optimizer(statics.optimizer_cfg)

  def one(p, o, d, k):
    step_key = jax.random.fold_in(k, step)
    batch = _draw_batch(d, jax.random.fold_in(step_key, 0), statics.batch_size)
    grads, metrics = jax.grad(_expert_loss, has_aux=True)(
        p, batch, jax.random.fold_in(step_key, 1), statics)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, metrics

  return jax.vmap(one)(params, opt_state, data, keys)


@functools.partial(jax.jit, static_argnames=("statics",))
def _losses(params: Params, data: dict[str, jax.Array], key: jax.Array, *,
            statics: _StepStatics) -> dict[str, jax.Array]:
  batch = _draw_batch(data, jax.random.fold_in(key, 0), statics.batch_size)
  return _expert_loss(params, batch, jax.random.fold_in(key, 1), statics)[1]


def expert_losses(params: Params, data: dict[str, np.ndarray], key: jax.Array,
                  unet_cfg: UNetConfig, diffusion_cfg: DiffusionConfig,
                  cfg: ExpertConfig, num_draws: int = 8) -> dict[str, float]:
  """Mean instance and prior losses of one expert, over `num_draws` noise draws.

  Args:
    params: one expert's UNet params (or the base model's).
    data: one subject's arrays as made by `prepare_subjects` (no leading S).
    key: PRNG key (use the same key to compare two sets of params).
    unet_cfg / diffusion_cfg / cfg: the configs.
    num_draws: batches averaged.

  Returns:
    {'instance_loss': float, 'prior_loss': float}.
  """
  statics = _StepStatics.of(unet_cfg, diffusion_cfg, cfg)
  params = nn.unbox(params)
  draws = [_losses(params, data, jax.random.fold_in(key, i), statics=statics)
           for i in range(num_draws)]
  return {name: float(np.mean([d[name] for d in draws])) for name in draws[0]}


def prepare_subjects(base_params: Params, text_encoder: TextEncoder, unet_cfg: UNetConfig,
                     diffusion_cfg: DiffusionConfig,
                     subjects: Sequence[tuple[np.ndarray, str]], cfg: ExpertConfig,
                     key: jax.Array,
                     instance_texts: Sequence[Sequence[str]] | None = None
                     ) -> list[dict[str, np.ndarray]]:
  """Per-subject training arrays, with class images generated once per class noun.

  Args:
    base_params: the frozen base UNet's params (they make the class images).
    text_encoder: the frozen text encoder.
    unet_cfg / diffusion_cfg / cfg: the configs.
    subjects: (uint8 images [K, H, W, 3], class noun) per subject.
    key: PRNG key for the class images.
    instance_texts: per subject, the training prompt of each of its images
      (`ExpertConfig.instance_prompts`); default `cfg.instance_prompts` without
      captions: 'a sks <class noun>' for all (an error with `instance_captions`).

  Returns:
    Per subject: 'instance_images' float [K_max, H, W, 3] (zero padded),
    'num_instance' int, 'class_images' float [num_class_images, H, W, 3], the
    images' prompt embeddings 'instance_emb' [K_max, L, D] with masks
    'instance_mask' [K_max, L] (padded slots: all False), and the class
    prompt's 'class_emb' [L, D] with its mask [L].
  """
  nouns = sorted({noun for _, noun in subjects})
  sampling_cfg = SamplingConfig(num_steps=cfg.class_sampling_steps,
                                guidance_scale=cfg.class_guidance_scale)
  class_images = {
      noun: to_float(render(base_params, [class_prompt(noun)] * cfg.num_class_images,
                            jax.random.fold_in(key, i), sampling_cfg,
                            text_encoder=text_encoder, unet_cfg=unet_cfg,
                            diffusion_cfg=diffusion_cfg))
      for i, noun in enumerate(nouns)}
  class_text = dict(zip(nouns, zip(*map(np.asarray, text_encoder.encode(
      [class_prompt(n) for n in nouns])))))
  if instance_texts is None:
    instance_texts = [t for images, noun in subjects
                      for t in cfg.instance_prompts(noun, len(images))]
  else:
    for i, ((images, _), texts) in enumerate(zip(subjects, instance_texts, strict=True)):
      if len(texts) != len(images):
        raise ValueError(f"subject {i}: {len(texts)} instance texts for {len(images)} images")
    instance_texts = [t for texts in instance_texts for t in texts]
  inst_emb, inst_mask = map(np.asarray, text_encoder.encode(instance_texts))
  k_max = max([cfg.max_instance_images] + [len(images) for images, _ in subjects])
  out, start = [], 0
  for i, (images, noun) in enumerate(subjects):
    if images.shape[1:3] != (unet_cfg.image_size, unet_cfg.image_size):
      raise ValueError(f"subject {i}: images are {images.shape[1:3]}, the UNet makes "
                       f"{unet_cfg.image_size} px")
    k = len(images)
    padded = np.zeros((k_max,) + images.shape[1:], np.float32)
    padded[:k] = to_float(images)
    emb = np.zeros((k_max,) + inst_emb.shape[1:], inst_emb.dtype)
    emb[:k] = inst_emb[start:start + k]
    mask = np.zeros((k_max,) + inst_mask.shape[1:], bool)
    mask[:k] = inst_mask[start:start + k]
    start += k
    out.append(dict(instance_images=padded, num_instance=np.int32(k),
                    class_images=class_images[noun], instance_emb=emb, instance_mask=mask,
                    class_emb=class_text[noun][0], class_mask=class_text[noun][1]))
  return out


def finetune_prepared(base_params: Params, data: Sequence[dict[str, np.ndarray]],
                      unet_cfg: UNetConfig, diffusion_cfg: DiffusionConfig,
                      cfg: ExpertConfig, key: jax.Array) -> list[Params]:
  """Fine-tunes one expert per prepared subject, `cfg.max_parallel_experts` at a
  time (the last chunk padded with repeats whose results are dropped), so the
  vmapped step compiles once.

  Subject i's randomness is `fold_in(key, i)`, so the result does not depend on
  how subjects are grouped into vmapped chunks.

  Args:
    base_params: the base UNet's params (boxed or not); every expert starts here.
    data: `prepare_subjects` output.
    unet_cfg / diffusion_cfg / cfg: the configs.
    key: PRNG key.

  Returns:
    One unboxed UNet param tree per subject.
  """
  base = nn.unbox(base_params)
  tx = make_optimizer(cfg.optimizer_config())
  statics = _StepStatics.of(unet_cfg, diffusion_cfg, cfg)
  experts = []
  if not data:
    return experts
  # Every chunk has max_parallel_experts slots, so one compiled step serves
  # every call of a run, whatever its number of subjects.
  size = max(1, cfg.max_parallel_experts)
  for start in range(0, len(data), size):
    chunk = list(data[start:start + size])
    real = len(chunk)
    chunk += [chunk[-1]] * (size - real)
    params = jax.tree.map(lambda x: jnp.stack([x] * size), base)
    opt_state = jax.vmap(tx.init)(params)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *chunk)
    keys = jnp.stack([jax.random.fold_in(key, start + i) for i in range(size)])
    for step in range(cfg.num_steps):
      params, opt_state, _ = _train_step(params, opt_state, stacked, keys,
                                         jnp.int32(step), statics=statics)
    experts += [jax.tree.map(lambda x, i=i: x[i], params) for i in range(real)]
  return experts


def finetune_experts(base_params: Params, text_encoder: TextEncoder, unet_cfg: UNetConfig,
                     diffusion_cfg: DiffusionConfig,
                     subjects: Sequence[tuple[np.ndarray, str]], cfg: ExpertConfig,
                     key: jax.Array,
                     instance_texts: Sequence[Sequence[str]] | None = None) -> list[Params]:
  """DreamBooth: one fine-tuned UNet per subject, with class prior preservation.

  Each expert learns 'a sks <class noun>' (or each image's identifier caption,
  `instance_texts`) -> its subject's images while a lambda-weighted loss on the
  frozen model's own 'a <class noun>' samples keeps the class prior (Ruiz et al.
  2023, eq. 2).

  Args:
    base_params: the trained text-to-image UNet's params (boxed or not).
    text_encoder: the frozen text encoder.
    unet_cfg: the UNet's config.
    diffusion_cfg: schedule, prediction type and loss weighting.
    subjects: (uint8 images [K, H, W, 3] at the UNet's size, class noun) each.
    cfg: steps, optimizer, prior weight, class images.
    key: PRNG key.
    instance_texts: per subject, each image's training prompt
      (`ExpertConfig.instance_prompts`); default as in `prepare_subjects`.

  Returns:
    One unboxed UNet param tree per subject, in order.
  """
  class_key, train_key = jax.random.split(key)
  data = prepare_subjects(base_params, text_encoder, unet_cfg, diffusion_cfg, subjects,
                          cfg, class_key, instance_texts)
  return finetune_prepared(base_params, data, unet_cfg, diffusion_cfg, cfg, train_key)
