"""DreamBooth experts: prompt rule, loss drop, prior loss, vmap = separate, renderer."""

import dataclasses
import io

import flax.linen as nn
import jax
import numpy as np
import PIL.Image
import pytest

from configs import imagen_base64
from suti_jax import config as config_lib
from suti_jax.data import pipeline_interfaces
from suti_jax.data import synthetic
from suti_jax.experts import dreambooth
from suti_jax.experts import renderer as renderer_lib
from suti_jax.models import unet as unet_lib
from suti_jax.models.text import load_text_encoder

# Short on purpose: 2 cores are shared. Measured with eps-prediction (random-init tiny UNet, 16 px, Adam
# lr 1e-3, 40 steps): instance loss 1.283 -> 0.204 (6.3x) and 1.289 -> 0.212; prior
# loss 1.27 -> 0.37 (the random model's class images are learnable too).
_CFG = dataclasses.replace(dreambooth.ExpertConfig.tiny(), num_steps=40, num_class_images=4,
                           class_sampling_steps=2, max_parallel_experts=2)


@pytest.fixture(scope="module")
def world():
  c = imagen_base64.get_config("tiny")
  unet_cfg = config_lib.section(config_lib.UNetConfig, c.model)
  diffusion_cfg = config_lib.section(config_lib.DiffusionConfig, c.diffusion)
  text_cfg = config_lib.section(config_lib.TextEncoderConfig, c.text)
  encoder = load_text_encoder(text_cfg, jax.random.PRNGKey(0))
  params = nn.unbox(
      unet_lib.init_params(unet_cfg, jax.random.PRNGKey(1), text_cfg.max_length)["params"])
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


def test_class_prompts_put_the_class_noun_back():
  assert dreambooth.class_prompts(["a photo of the sks toy on a beach", "a beach, sks owl"]) == (
      ["a photo of the toy on a beach", "a beach, owl"], ["a toy", "a owl"])
  with_prompt, plain = dreambooth.class_prompts(["a zwx cup in the snow"], "zwx")
  assert (with_prompt, plain) == (["a cup in the snow"], ["a cup"])
  with pytest.raises(ValueError, match="a red cup"):
    dreambooth.class_prompts(["a red cup"])


def test_base_text_guidance_adds_the_base_models_text_direction(world):
  common = dict(text_encoder=world["encoder"], unet_cfg=world["unet_cfg"],
                diffusion_cfg=world["diffusion_cfg"])
  sampling = config_lib.SamplingConfig(num_steps=2, guidance_scale=2.0)
  expert = jax.tree.map(lambda x: x * 1.01, world["params"])
  key = jax.random.PRNGKey(5)
  prompts = ["a sks toy", "a sks toy on a beach at night"]
  alone = dreambooth.render(expert, prompts, key, sampling, **common)
  guided = dreambooth.render(expert, prompts, key, sampling, base_params=world["params"],
                             base_text_guidance=3.0, **common)
  # 'a sks toy' in the base's words is the plain class prompt: no direction to add.
  np.testing.assert_array_equal(guided[0], alone[0])
  assert np.abs(guided[1].astype(int) - alone[1].astype(int)).mean() > 1.0
  with pytest.raises(ValueError, match="base_params"):
    dreambooth.render(expert, prompts, key, sampling, base_text_guidance=3.0, **common)
  with pytest.raises(ValueError, match="guidance_scale"):
    dreambooth.render(expert, prompts, key, dataclasses.replace(sampling, guidance_scale=0.0),
                      base_params=world["params"], base_text_guidance=3.0, **common)


def test_class_images_come_from_the_frozen_model(world):
  for (images, _), d in zip(world["subjects"], world["data"]):
    assert d["class_images"].shape == (_CFG.num_class_images, 16, 16, 3)
    assert np.abs(d["class_images"]).max() <= 1.0
    assert int(d["num_instance"]) == len(images)
    # Samples of the base model, not copies of the subject's images.
    gap = d["class_images"][:, None] - d["instance_images"][None, :len(images)]
    assert np.abs(gap).mean(axis=(2, 3, 4)).min() > 0.05


@pytest.fixture(scope="module")
def experts(world):
  """Both subjects' experts, vmapped together and one at a time (same keys)."""
  common = dict(unet_cfg=world["unet_cfg"], diffusion_cfg=world["diffusion_cfg"],
                key=jax.random.PRNGKey(3))
  together = dreambooth.finetune_prepared(world["params"], world["data"], cfg=_CFG, **common)
  separate = dreambooth.finetune_prepared(
      world["params"], world["data"], cfg=dataclasses.replace(_CFG, max_parallel_experts=1),
      **common)
  return together, separate


def test_expert_loss_drops_and_prior_loss_is_computed(world, experts):
  key = jax.random.PRNGKey(5)
  common = dict(unet_cfg=world["unet_cfg"], diffusion_cfg=world["diffusion_cfg"], cfg=_CFG)
  for data, expert in zip(world["data"], experts[0]):
    before = dreambooth.expert_losses(world["params"], data, key, **common)
    after = dreambooth.expert_losses(expert, data, key, **common)
    print("losses before/after", before, after)
    assert np.isfinite(before["prior_loss"]) and before["prior_loss"] > 0
    assert np.isfinite(after["prior_loss"]) and after["prior_loss"] > 0
    # With v-prediction (the tiny configs' objective) measured 1.006 -> 0.293 (3.4x).
    assert after["instance_loss"] < before["instance_loss"] / 2.5, (before, after)
    # The prior term is a separate loss on the class images, not the instance loss.
    assert after["prior_loss"] != pytest.approx(after["instance_loss"], rel=1e-3)


def _global_norm(tree) -> float:
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x))) for x in jax.tree.leaves(tree))))


@pytest.mark.slow  # several expert fine-tunes
def test_vmapped_finetune_equals_separate_finetunes(world, experts):
  together, separate = experts
  base = jax.tree.map(np.asarray, world["params"])
  for a, b in zip(together, separate):
    moved = _global_norm(jax.tree.map(lambda x, p: x - p, a, base))
    diff = _global_norm(jax.tree.map(lambda x, y: x - y, a, b))
    print("moved", moved, "diff", diff)
    assert moved > 0.1  # The experts did train.
    # Measured: diff / moved = 5.7e-4 and 5.3e-4 (float reassociation under vmap).
    assert diff < 1e-2 * moved, (diff, moved)
  # The two experts differ: each saw only its own subject.
  between = _global_norm(jax.tree.map(lambda x, y: x - y, together[0], together[1]))
  print("between", between)
  assert between > 0.5 * moved


def _png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  PIL.Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


@pytest.mark.slow  # several expert fine-tunes
def test_expert_target_renderer_renders_every_prompt(world):
  images, noun = world["subjects"][0]
  members = tuple(pipeline_interfaces.WebRecord(
      f"id{i}", f"http://shop/{i}", f"a red and blue {noun} in scene {i}", _png(x))
      for i, x in enumerate(images))
  cluster = pipeline_interfaces.Cluster("shop", members, description=f"red and blue {noun}")
  # As many prompts as class images, and the same sampler settings: the compiled
  # sampler of the fixture is reused.
  prompts = [pipeline_interfaces.PromptSpec("stylization", f"a photo of the red and blue {noun} in sepia"),
             pipeline_interfaces.PromptSpec("novel_view", f"red and blue {noun} upside down"),
             pipeline_interfaces.PromptSpec("accessorization", f"a red and blue {noun} wearing a hat"),
             pipeline_interfaces.PromptSpec("recontextualization", f"the red and blue {noun} at night")]
  base = renderer_lib.BaseModel(
      world["params"], world["encoder"], world["unet_cfg"], world["diffusion_cfg"],
      config_lib.SamplingConfig(num_steps=_CFG.class_sampling_steps,
                                guidance_scale=_CFG.class_guidance_scale))
  renderer = renderer_lib.ExpertTargetRenderer(
      base=base, expert_cfg=dataclasses.replace(_CFG, num_steps=2))
  renderer.setup()
  targets = renderer.render_targets(cluster, prompts, seed=7)
  assert [t.prompt for t in targets] == [p.prompt for p in prompts]
  assert all(t.error == "" and t.image.shape == (16, 16, 3) and t.image.dtype == np.uint8
             for t in targets)
  # The recipe's render guidance reaches the sampler (other scale, other images).
  guided = renderer_lib.ExpertTargetRenderer(
      base=base, expert_cfg=dataclasses.replace(_CFG, num_steps=2, render_guidance_scale=6.0))
  guided.setup()
  guided_targets = guided.render_targets(cluster, prompts, seed=7)
  assert any(not np.array_equal(a.image, b.image) for a, b in zip(targets, guided_targets))
  # A dict `sampling_cfg` overrides only its fields of the base's sampling config:
  # the base's own step count renders the same images, another count other images.
  def render_with_steps(num_steps):
    stepped = renderer_lib.ExpertTargetRenderer(
        base=base, expert_cfg=dataclasses.replace(_CFG, num_steps=2),
        sampling_cfg={"num_steps": num_steps})
    stepped.setup()
    return stepped.render_targets(cluster, prompts, seed=7)
  assert all(np.array_equal(a.image, b.image) for a, b in
             zip(targets, render_with_steps(_CFG.class_sampling_steps)))
  assert any(not np.array_equal(a.image, b.image) for a, b in
             zip(targets, render_with_steps(1)))
  # Captioned experts train on 'a sks <noun> in scene i' (other texts, other experts).
  captioned = renderer_lib.ExpertTargetRenderer(
      base=base, expert_cfg=dataclasses.replace(_CFG, num_steps=2, instance_captions=True))
  captioned.setup()
  captioned_targets = captioned.render_targets(cluster, prompts, seed=7)
  assert all(t.error == "" for t in captioned_targets)
  assert any(not np.array_equal(a.image, b.image) for a, b in zip(targets, captioned_targets))
  no_description = dataclasses.replace(cluster, description="")
  assert all(t.image is None and t.error for t in renderer.render_targets(
      no_description, prompts, seed=7))
  with pytest.raises(ValueError):
    renderer_lib.ExpertTargetRenderer()
  with pytest.raises(ValueError, match="num_stpes"):
    renderer_lib.ExpertTargetRenderer(base=base, sampling_cfg={"num_stpes": 8})


def test_render_sampling_replaces_only_the_guidance_scale():
  sampling = config_lib.SamplingConfig(num_steps=9, guidance_scale=1.35)
  assert dreambooth.ExpertConfig().render_sampling(sampling) is sampling
  guided = dreambooth.ExpertConfig(render_guidance_scale=4.0).render_sampling(sampling)
  assert guided == dataclasses.replace(sampling, guidance_scale=4.0)


def test_instance_prompts_are_the_identifier_captions_when_asked():
  captions = ["a red owl on the beach", "the Red Owl at night", "an owl"]
  plain = dreambooth.ExpertConfig(identifier="zwx")
  assert plain.instance_prompts("owl", 3) == ["a zwx owl"] * 3
  captioned = dataclasses.replace(plain, instance_captions=True)
  assert captioned.instance_prompts("owl", 3, captions, "red owl") == [
      "a zwx owl on the beach", "the zwx owl at night", "an owl, zwx owl"]
  for bad in (dict(captions=None, subject_phrase="red owl"),
              dict(captions=captions[:2], subject_phrase="red owl"),
              dict(captions=captions, subject_phrase="")):
    with pytest.raises(ValueError, match="instance_captions"):
      captioned.instance_prompts("owl", 3, **bad)


def test_each_instance_image_trains_on_its_own_prompt(world):
  """`instance_texts` gives image i the embedding of text i; padded slots get none."""
  subjects = world["subjects"]
  texts = [[f"{i} sks {noun}" for i in range(len(images))]  # within max_length 16
           for images, noun in subjects]
  data = dreambooth.prepare_subjects(
      world["params"], world["encoder"], world["unet_cfg"], world["diffusion_cfg"], subjects,
      _CFG, jax.random.PRNGKey(2), texts)
  for (images, noun), subject_texts, d, default in zip(subjects, texts, data, world["data"]):
    k = len(images)
    emb, mask = map(np.asarray, world["encoder"].encode(subject_texts))
    np.testing.assert_allclose(d["instance_emb"][:k], emb, rtol=1e-4, atol=1e-4)  # other batch sizes
    np.testing.assert_array_equal(d["instance_mask"][:k], mask)
    assert not d["instance_mask"][k:].any() and not d["instance_emb"][k:].any()
    assert d["instance_emb"].shape[0] == _CFG.max_instance_images
    # The default gives every image the same 'a sks <noun>'; these texts differ.
    one, _ = map(np.asarray, world["encoder"].encode([dreambooth.instance_prompt(noun)]))
    np.testing.assert_allclose(default["instance_emb"][:k], np.repeat(one, k, axis=0),
                               rtol=1e-4, atol=1e-4)  # other batch sizes
    assert not np.allclose(emb[0], emb[1])
  # A drawn batch pairs each image with its own text.
  batch = dreambooth._draw_batch(jax.tree.map(jax.numpy.asarray, data[0]),
                                 jax.random.PRNGKey(4), 16)
  for image, emb in zip(np.asarray(batch["instance"]), np.asarray(batch["instance_emb"])):
    (i,) = [j for j in range(len(subjects[0][0]))
            if np.array_equal(image, data[0]["instance_images"][j])]
    np.testing.assert_array_equal(emb, data[0]["instance_emb"][i])
  with pytest.raises(ValueError, match="subject 0: 1 instance texts for 3 images"):
    dreambooth.prepare_subjects(world["params"], world["encoder"], world["unet_cfg"],
                                world["diffusion_cfg"], subjects, _CFG, jax.random.PRNGKey(2),
                                [texts[0][:1], texts[1]])


def _mse(images: np.ndarray, target: np.ndarray) -> float:
  return float(np.mean(np.square(images.astype(np.float32) - target.astype(np.float32))))


@pytest.mark.slow
def test_expert_improves_subject_fidelity_over_the_base_model(tmp_path):
  from suti_jax.train import loop  # The trainer: only this slow test needs it.
  c = imagen_base64.get_config("tiny")
  c.text.max_length = 32  # Room for 'a red and blue toy on a beach'.
  c.train.total_steps = 300
  c.train.checkpoint_every_steps = 300
  loop.run(c, str(tmp_path))
  base = renderer_lib.load_base_model(str(tmp_path))
  # A subject the base model never saw (it trains on seeds < data.num_subjects).
  subject = synthetic.make_subject(5000)
  rng = np.random.default_rng(0)
  scenes = [synthetic.Scene()] * 2 + [synthetic.random_scene("recontextualization", rng)
                                      for _ in range(2)]
  size = base.unet_cfg.image_size
  images = np.stack([synthetic.render(subject, s, size) for s in scenes])
  expert = dreambooth.finetune_experts(
      base.params, base.text_encoder, base.unet_cfg, base.diffusion_cfg,
      [(images, subject.class_noun)], dreambooth.ExpertConfig.tiny(), jax.random.PRNGKey(0))[0]
  prompts = [dreambooth.instance_prompt(subject.class_noun)] * 8
  common = dict(text_encoder=base.text_encoder, unet_cfg=base.unet_cfg,
                diffusion_cfg=base.diffusion_cfg)
  key = jax.random.PRNGKey(1)
  base_images = dreambooth.render(base.params, prompts, key, base.sampling_cfg, **common)
  expert_images = dreambooth.render(expert, prompts, key, base.sampling_cfg, **common)
  truth = synthetic.render(subject, synthetic.Scene(), size)
  base_mse, expert_mse = _mse(base_images, truth), _mse(expert_images, truth)
  print("pixel MSE to the subject's plain render: base", base_mse, "expert", expert_mse)
  # Measured: base 12271, expert 11564 (ratio 0.94). The gain is small because a
  # 300-step tiny base model samples blobs (mean intensity ~128 vs the render's
  # ~216) that 150 expert steps only partly pull toward the subject.
  assert expert_mse < 0.97 * base_mse
