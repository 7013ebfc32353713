"""DreamBooth experts: prompt rule, loss drop, prior loss, vmap = separate, renderer."""

import dataclasses
import io

import jax
import numpy as np
import PIL.Image
import pytest

from configs import imagen_base64
from data_pipeline import interfaces
from suti_jax import config as config_lib
from suti_jax.data import synthetic
from suti_jax.experts import dreambooth
from suti_jax.experts import renderer as renderer_lib
from suti_jax.models import unet as unet_lib
from suti_jax.models.text import load_text_encoder

# Short on purpose: 2 cores are shared. Measured (random-init tiny UNet, 16 px, Adam
# lr 1e-3): instance loss 1.27 -> 0.22 after 60 steps (5.8x); see the asserts.
_CFG = dataclasses.replace(dreambooth.ExpertConfig.tiny(), num_steps=40, num_class_images=4,
                           class_sampling_steps=2, max_parallel_experts=2)


@pytest.fixture(scope="module")
def world():
  c = imagen_base64.get_config("tiny")
  unet_cfg = config_lib.section(config_lib.UNetConfig, c.model)
  diffusion_cfg = config_lib.section(config_lib.DiffusionConfig, c.diffusion)
  text_cfg = config_lib.section(config_lib.TextEncoderConfig, c.text)
  encoder = load_text_encoder(text_cfg, jax.random.PRNGKey(0))
  params = unet_lib.init_params(unet_cfg, jax.random.PRNGKey(1), text_cfg.max_length)["params"]
  rng = np.random.default_rng(0)
  subjects = []
  for seed in (11, 12):
    subject = synthetic.make_subject(seed)
    scenes = [synthetic.Scene()] + [synthetic.random_scene("recontextualization", rng)
                                    for _ in range(2)]
    subjects.append((np.stack([synthetic.render(subject, s, unet_cfg.image_size)
                               for s in scenes]), subject.class_noun))
  data = dreambooth.prepare_subjects(params, encoder, unet_cfg, diffusion_cfg, subjects, _CFG,
                                     jax.random.PRNGKey(2))
  return dict(unet_cfg=unet_cfg, diffusion_cfg=diffusion_cfg, encoder=encoder, params=params,
              subjects=subjects, data=data)


def test_identifier_prompt_replaces_the_subject_phrase():
  assert dreambooth.identifier_prompt(
      "a photo of the red and blue toy on a beach", "red and blue toy", "toy"
  ) == "a photo of the sks toy on a beach"
  # Case-insensitive, whole words only, first occurrence.
  assert dreambooth.identifier_prompt("A Red Owl and a red owlet", "red owl", "owl",
                                      "zwx") == "A zwx owl and a red owlet"
  # No phrase: the identifier is appended, the prompt is kept.
  assert dreambooth.identifier_prompt("a beach at night", "red owl", "owl") == (
      "a beach at night, sks owl")
  assert dreambooth.instance_prompt("owl") == "a sks owl"
  assert dreambooth.class_prompt("owl") == "a owl"


def test_class_images_come_from_the_frozen_model(world):
  for (images, _), d in zip(world["subjects"], world["data"]):
    assert d["class_images"].shape == (_CFG.num_class_images, 16, 16, 3)
    assert np.abs(d["class_images"]).max() <= 1.0
    assert int(d["num_instance"]) == len(images)
    # Samples of the base model, not copies of the subject's images.
    gap = d["class_images"][:, None] - d["instance_images"][None, :len(images)]
    assert np.abs(gap).mean(axis=(2, 3, 4)).min() > 0.05


def test_expert_loss_drops_and_prior_loss_is_computed(world):
  key = jax.random.PRNGKey(5)
  common = dict(unet_cfg=world["unet_cfg"], diffusion_cfg=world["diffusion_cfg"], cfg=_CFG)
  data = world["data"][0]
  before = dreambooth.expert_losses(world["params"], data, key, **common)
  expert = dreambooth.finetune_prepared(world["params"], world["data"][:1], key=jax.random.PRNGKey(3),
                                        **common)[0]
  after = dreambooth.expert_losses(expert, data, key, **common)
  assert np.isfinite(before["prior_loss"]) and before["prior_loss"] > 0
  assert np.isfinite(after["prior_loss"]) and after["prior_loss"] > 0
  assert after["instance_loss"] < before["instance_loss"] / 2.5, (before, after)
  # The prior term is a real, separate loss on the class images, not a copy of the
  # instance loss.
  assert after["prior_loss"] != pytest.approx(after["instance_loss"], rel=1e-3)


def test_vmapped_finetune_equals_separate_finetunes(world):
  common = dict(unet_cfg=world["unet_cfg"], diffusion_cfg=world["diffusion_cfg"],
                key=jax.random.PRNGKey(4))
  cfg = dataclasses.replace(_CFG, num_steps=3)
  together = dreambooth.finetune_prepared(world["params"], world["data"], cfg=cfg, **common)
  separate = dreambooth.finetune_prepared(
      world["params"], world["data"], cfg=dataclasses.replace(cfg, max_parallel_experts=1),
      **common)
  base = jax.tree.leaves(jax.tree.map(np.asarray, world["params"]))
  for a, b in zip(together, separate):
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    diff = max(float(np.abs(x - y).max()) for x, y in zip(a, b))
    moved = max(float(np.abs(x - p).max()) for x, p in zip(a, base))
    assert moved > 1e-3  # The experts did train.
    assert diff < 1e-2 * moved, (diff, moved)
  # And the two experts differ: each saw only its own subject.
  diff_ab = max(float(np.abs(x - y).max())
                for x, y in zip(jax.tree.leaves(together[0]), jax.tree.leaves(together[1])))
  assert diff_ab > 1e-4


def _png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  PIL.Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def test_expert_target_renderer_renders_every_prompt(world):
  images, noun = world["subjects"][0]
  members = tuple(interfaces.WebRecord(f"id{i}", f"http://shop/{i}", "cap", _png(x))
                  for i, x in enumerate(images))
  cluster = interfaces.Cluster("shop", members, description=f"red and blue {noun}")
  prompts = [interfaces.PromptSpec("stylization", f"a photo of the red and blue {noun} in sepia"),
             interfaces.PromptSpec("novel_view", f"red and blue {noun} upside down")]
  base = renderer_lib.BaseModel(
      world["params"], world["encoder"], world["unet_cfg"], world["diffusion_cfg"],
      config_lib.SamplingConfig(num_steps=2))
  renderer = renderer_lib.make_target_renderer(
      base=base, expert_cfg=dataclasses.replace(_CFG, num_steps=2))
  renderer.setup()
  targets = renderer.render_targets(cluster, prompts, seed=7)
  assert [t.prompt for t in targets] == [p.prompt for p in prompts]
  assert all(t.error == "" and t.image.shape == (16, 16, 3) and t.image.dtype == np.uint8
             for t in targets)
  no_description = dataclasses.replace(cluster, description="")
  assert all(t.image is None and t.error for t in renderer.render_targets(
      no_description, prompts, seed=7))
  with pytest.raises(ValueError):
    renderer_lib.ExpertTargetRenderer()
