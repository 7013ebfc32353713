"""`ExpertTargetRenderer`: the Beam pipeline's DreamBooth target renderer.

Loads the base text-to-image model once per worker, fine-tunes one expert per
cluster on the cluster's images and renders all of the cluster's prompts in a batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from suti_jax import config as config_lib
from suti_jax.config import DiffusionConfig, SamplingConfig, UNetConfig
from suti_jax.data import images as images_lib
from suti_jax.data import pipeline_interfaces
from suti_jax.experts import dreambooth
from suti_jax.inference import stage as inference_stage
from suti_jax.models.text import TextEncoder, build_tokenizer


@dataclasses.dataclass(frozen=True)
class BaseModel:
  """A trained text-to-image stage: what every expert starts from.

  Attributes:
    params: UNet params (boxed or not).
    text_encoder: the frozen text encoder it was trained with.
    unet_cfg / diffusion_cfg / sampling_cfg: the stage's configs.
  """

  params: Any
  text_encoder: TextEncoder
  unet_cfg: UNetConfig
  diffusion_cfg: DiffusionConfig
  sampling_cfg: SamplingConfig


def load_base_model(workdir: str, *, use_ema: bool = True) -> BaseModel:
  """Restores a trainer workdir's latest checkpoint (UNet and text params) on one device.

  Args:
    workdir: a `suti_jax.train.loop.run` workdir (checkpoints in `<workdir>/checkpoints`).
    use_ema: take the EMA params (what the trainer samples with).

  Returns:
    The base model with the run's own configs.
  """
  stage = inference_stage.load_stage(workdir, use_ema=use_ema)
  text_cfg = stage.spec.text
  encoder = TextEncoder(text_cfg, build_tokenizer(text_cfg), stage.text_params)
  return BaseModel(stage.params, encoder, stage.spec.model, stage.spec.diffusion,
                   stage.spec.sampling)


def class_noun_of(description: str) -> str:
  """A consolidated description's class noun: its last word ('red and blue toy' -> 'toy')."""
  words = description.strip().split()
  return words[-1] if words else ""


class ExpertTargetRenderer(pipeline_interfaces.TargetRenderer):
  """DreamBooth targets: one expert per cluster, fine-tuned on the cluster's images.

  The expert's prompt for a target is the pipeline prompt with the cluster's
  description (the subject phrase) replaced by 'sks <class noun>', the class
  noun being the description's last word (`dreambooth.identifier_prompt`).
  """

  name = "expert"

  def __init__(self, *, workdir: str = "", base: BaseModel | None = None,
               expert_cfg: dreambooth.ExpertConfig | dict | None = None,
               sampling_cfg: SamplingConfig | dict | None = None, max_images: int = 5):
    """Configures the renderer; nothing is loaded before `setup`.

    Args:
      workdir: trainer workdir of the base text-to-image stage (`load_base_model`).
      base: or the base model in memory (tests, the demo); exactly one of the two.
      expert_cfg: fine-tuning recipe, or a dict of `ExpertConfig.tiny()` field
        overrides (the pipeline's JSON `--renderer_options`); default
        `ExpertConfig.tiny()`.
      sampling_cfg: how targets are sampled, or a dict of field overrides of the
        base stage's sampling config (the pipeline's JSON `--renderer_options`,
        e.g. {"num_steps": 8}); default the base stage's. The expert recipe's
        `render_guidance_scale`, when set, replaces its guidance scale.
      max_images: cluster images an expert trains on (DreamBooth: 3-5).
    """
    if bool(workdir) == (base is not None):
      raise ValueError("ExpertTargetRenderer needs exactly one of workdir= and base=")
    if isinstance(sampling_cfg, dict):
      # Names and types checked now, as config sections are; the values apply to the
      # base's sampling config, which `setup` loads.
      config_lib.section(SamplingConfig, sampling_cfg, "sampling_cfg")
    self._workdir = workdir
    self._base = base
    if isinstance(expert_cfg, dict):
      expert_cfg = dataclasses.replace(dreambooth.ExpertConfig.tiny(), **expert_cfg)
    self._expert_cfg = expert_cfg or dreambooth.ExpertConfig.tiny()
    self._sampling_cfg = sampling_cfg
    self._max_images = max_images

  def setup(self) -> None:
    """Loads the base model once (a no-op for an in-memory one)."""
    if self._base is None:
      self._base = load_base_model(self._workdir)

  def _subject_images(self, cluster: pipeline_interfaces.Cluster) -> np.ndarray:
    size = self._base.unet_cfg.image_size
    decoded = [images_lib.decode_array(m.image) for m in cluster.members[:self._max_images]]
    return np.stack([dreambooth.to_uint8(images_lib.preprocess_array(x, size))
                     for x in decoded])

  def _instance_prompts(self, cluster: pipeline_interfaces.Cluster, noun: str) -> list[str]:
    members = cluster.members[:self._max_images]
    return self._expert_cfg.instance_prompts(noun, len(members), [m.caption for m in members],
                                             cluster.description)

  def render_targets(self, cluster: pipeline_interfaces.Cluster,
                     prompts: Sequence[pipeline_interfaces.PromptSpec], seed: int
                     ) -> list[pipeline_interfaces.Target]:
    """Fine-tunes the cluster's expert and renders every prompt in one batch."""
    return self.render_batch([pipeline_interfaces.RenderTask(cluster, tuple(prompts))], seed)[0]

  def render_batch(self, tasks: Sequence[pipeline_interfaces.RenderTask], seed: int
                   ) -> list[list[pipeline_interfaces.Target]]:
    """Fine-tunes one expert per cluster (vmapped, `max_parallel_experts` at a time),
    then renders each cluster's prompts in one batch.

    Args:
      tasks: clusters and prompts; a cluster's members' images train its expert
        and its description names the subject in the prompts.
      seed: seeds the class images, the fine-tunes and the sampler.

    Returns:
      Per task, one Target per prompt (image uint8 [H, W, 3]), or Targets with an error.
    """
    if self._base is None:
      raise RuntimeError("ExpertTargetRenderer.setup() was not called")
    base, cfg = self._base, self._expert_cfg
    key = jax.random.PRNGKey(seed % 2**31)
    nouns = [class_noun_of(t.cluster.description) for t in tasks]
    ready = [i for i, t in enumerate(tasks) if nouns[i] and t.cluster.members and t.prompts]
    experts = dict(zip(ready, dreambooth.finetune_experts(
        base.params, base.text_encoder, base.unet_cfg, base.diffusion_cfg,
        [(self._subject_images(tasks[i].cluster), nouns[i]) for i in ready], cfg,
        jax.random.fold_in(key, 0),
        [self._instance_prompts(tasks[i].cluster, nouns[i]) for i in ready])))
    sampling = self._sampling_cfg
    if not isinstance(sampling, SamplingConfig):
      sampling = dataclasses.replace(base.sampling_cfg, **(sampling or {}))
    sampling = cfg.render_sampling(sampling)
    out = []
    for i, task in enumerate(tasks):
      if i not in experts:
        error = "cluster has no description, no images or no prompts"
        out.append([pipeline_interfaces.Target(p.skill, p.prompt, None, error=error)
                    for p in task.prompts])
        continue
      expert_prompts = [dreambooth.identifier_prompt(p.prompt, task.cluster.description,
                                                     nouns[i], cfg.identifier)
                        for p in task.prompts]
      rendered = dreambooth.render(
          experts[i], expert_prompts, jax.random.fold_in(jax.random.fold_in(key, 1), i),
          sampling, text_encoder=base.text_encoder,
          unet_cfg=base.unet_cfg, diffusion_cfg=base.diffusion_cfg,
          **cfg.render_options(base.params))
      out.append([pipeline_interfaces.Target(p.skill, p.prompt, image)
                  for p, image in zip(task.prompts, rendered)])
    return out


def make_target_renderer(**options: Any) -> ExpertTargetRenderer:
  """The pipeline's 'expert' renderer factory: `ExpertTargetRenderer(**options)`."""
  return ExpertTargetRenderer(**options)
