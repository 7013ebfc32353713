"""Parity of the DINO/CLIP embedders, converters and CLIP tokenizer with HF transformers."""

import collections
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from suti_jax.eval import clip
from suti_jax.eval import clip_tokenizer
from suti_jax.eval import convert
from suti_jax.eval import dino
from suti_jax.eval import metrics
from suti_jax.models import hf_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = [
    "a dog in the jungle",
    "A Red  BACKPACK with the Eiffel Tower in the background!",
    "it's a cat's toy, isn't it? we'll see; you'd've guessed",
    "a cube-shaped teapot (shiny) on top of a mirror...",
    "2 dogs & 13 cats: 100% fluffy #pets @home",
    "Café crème brûlée, naïve façade",
    "日本の犬 と 猫",
    "tabs\tand\nnewlines   and    spaces",
    "a 'quoted' and \"double quoted\" sneaker -- wow!!!",
    "emoji 🐶🐱 and symbols ©®™ ½ ²",
    "<|startoftext|> literal special tokens <|endoftext|>",
    "a very long prompt " + " ".join(f"word{i}" for i in range(100)),
    "",
]


def _train_merges(texts, num_merges):
  """A minimal BPE trainer over CLIP's pre-tokenized byte symbols (test vocabulary only)."""
  chars = clip_tokenizer.bytes_to_unicode()
  words = collections.Counter()
  for text in texts:
    for piece in clip_tokenizer.pre_tokenize(text.lower()):
      symbols = [chars[b] for b in piece.encode("utf-8")]
      words[tuple(symbols[:-1] + [symbols[-1] + "</w>"])] += 1
  merges = []
  for _ in range(num_merges):
    pairs = collections.Counter()
    for word, count in words.items():
      for pair in zip(word, word[1:]):
        pairs[pair] += count
    if not pairs:
      break
    best = max(pairs, key=lambda p: (pairs[p], p))
    merges.append(best)
    merged = collections.Counter()
    for word, count in words.items():
      out, i = [], 0
      while i < len(word):
        if word[i:i + 2] == best:
          out.append(word[i] + word[i + 1])
          i += 2
        else:
          out.append(word[i])
          i += 1
      merged[tuple(out)] += count
    words = merged
  return merges


def _vocab_and_merges():
  merges = _train_merges(PROMPTS * 3 + ["the dog and the cat in the snow"] * 5, 120)
  chars = list(clip_tokenizer.bytes_to_unicode().values())
  tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
  tokens += [clip_tokenizer.BOS, clip_tokenizer.EOS]
  return {t: i for i, t in enumerate(dict.fromkeys(tokens))}, merges


def test_tokenizer_matches_hf(tmp_path):
  vocab, merges = _vocab_and_merges()
  (tmp_path / "vocab.json").write_text(json.dumps(vocab))
  (tmp_path / "merges.txt").write_text(
      "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  ours = clip_tokenizer.CLIPTokenizer.from_dir(tmp_path)
  ids, mask = ours(PROMPTS)
  hf = transformers.CLIPTokenizer.from_pretrained(tmp_path)  # Reads the same two files.
  want = hf(PROMPTS, padding="max_length", max_length=77, truncation=True)
  np.testing.assert_array_equal(ids, np.asarray(want["input_ids"]))
  np.testing.assert_array_equal(mask, np.asarray(want["attention_mask"], bool))
  # The merges did something: fewer tokens than bytes for a common phrase.
  assert len(ours.encode("the dog and the cat")) < len("the dog and the cat")


def test_tokenizer_rejects_vocab_without_specials():
  with pytest.raises(ValueError, match="endoftext"):
    clip_tokenizer.CLIPTokenizer({"a": 0, clip_tokenizer.BOS: 1}, [])


def _tiny_vit(tmp_path):
  torch.manual_seed(0)
  config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, image_size=32, patch_size=8)
  model = transformers.ViTModel(config, add_pooling_layer=False).eval()
  model.save_pretrained(tmp_path)
  return model


def test_dino_parity(tmp_path):
  model = _tiny_vit(tmp_path)
  config, params = convert.load_dino(tmp_path)
  pixels = np.random.RandomState(0).randn(3, 32, 32, 3).astype(np.float32)
  ours = dino.DinoViT(config).apply({"params": params}, pixels)
  with torch.no_grad():
    want = model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
  want = want.last_hidden_state[:, 0]
  np.testing.assert_allclose(np.asarray(ours), want.numpy(), atol=1e-4, rtol=0)
  # Round trip through the converted msgpack + JSON format.
  convert.save(tmp_path / "out" / "dino.msgpack", "dino", config, params)
  config2, params2 = convert.load_dino(tmp_path / "out" / "dino.msgpack")
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_dino_converter_errors_name_the_key(tmp_path):
  _tiny_vit(tmp_path)
  config, _ = convert.convert_dino_dir(tmp_path)
  state = dict(hf_checkpoint.read_checkpoint(tmp_path))
  target = jax.eval_shape(dino.DinoViT(config).init, jax.random.key(0), np.zeros((1, 32, 32, 3)))
  mapping = convert.dino_mapping(config)
  key = "encoder.layer.1.attention.attention.value.weight"
  with pytest.raises(convert.ConversionError, match="lacks key.*" + key):
    convert.convert({k: v for k, v in state.items() if k != key}, mapping, target["params"])
  with pytest.raises(convert.ConversionError, match=key + ".*expects"):
    convert.convert({**state, key: np.zeros((32, 31))}, mapping, target["params"])
  with pytest.raises(convert.ConversionError, match="unexpected.*extra.weight"):
    convert.convert({**state, "extra.weight": np.zeros(3)}, mapping, target["params"])


def _tiny_clip(tmp_path, eos_token_id, vocab_size=100, bos_token_id=98, max_positions=16):
  torch.manual_seed(0)
  text = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=64, max_position_embeddings=max_positions,
              bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id)
  vision = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                image_size=32, patch_size=8)
  config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
  model = transformers.CLIPModel(config).eval()
  model.save_pretrained(tmp_path)
  return model


@pytest.mark.parametrize("eos_token_id", [99, 2])  # 2: the legacy argmax(ids) pooling rule.
def test_clip_parity(tmp_path, eos_token_id):
  model = _tiny_clip(tmp_path, eos_token_id)
  config, params = convert.load_clip(tmp_path)
  rng = np.random.RandomState(0)
  pixels = rng.randn(2, 32, 32, 3).astype(np.float32)
  ids = np.full((3, 16), eos_token_id, np.int32)
  for row, length in enumerate((3, 9, 14)):
    ids[row, 0] = 98
    ids[row, 1:length] = rng.randint(3, 90, length - 1)
    ids[row, length] = eos_token_id if eos_token_id != 2 else 99  # Legacy: EOS has the max id.
  variables = {"params": params}
  ours_image = clip.CLIP(config).apply(variables, pixels, method="encode_image")
  ours_text = clip.CLIP(config).apply(variables, ids, method="encode_text")
  with torch.no_grad():
    image = model.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
    text = model.get_text_features(input_ids=torch.from_numpy(ids).long())
  image, text = (getattr(x, "pooler_output", x).numpy() for x in (image, text))
  np.testing.assert_allclose(np.asarray(ours_image), image, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(ours_text), text, atol=1e-4, rtol=0)


def test_clip_preprocess_matches_hf():
  image = np.random.RandomState(1).randint(0, 256, (40, 57, 3), np.uint8)
  config = clip.CLIPConfig(vision=clip.CLIPVisionConfig(image_size=32))
  processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                 crop_size={"height": 32, "width": 32})
  want = processor(images=[image], return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  np.testing.assert_allclose(clip.preprocess([image], config), want, atol=1e-5, rtol=0)


def test_dino_preprocess_resizes_and_crops():
  # A 256x256 image is not resized (256/224 of 224) and the 16 px border is cropped away.
  image = np.zeros((256, 256, 3), np.uint8)
  image[16:240, 16:240] = 255
  out = dino.preprocess([image], dino.DinoConfig())
  assert out.shape == (1, 224, 224, 3)
  np.testing.assert_allclose(out[0, 0, 0], (1 - np.array(dino.IMAGENET_MEAN)) / dino.IMAGENET_STD,
                             rtol=1e-6)


def test_converted_embedders_match_hf_end_to_end(tmp_path):
  """convert_weights CLI -> msgpack, HF folder -> `Embedders.load`, real tokenizer files."""
  vit = _tiny_vit(tmp_path / "dino")
  proc = subprocess.run(
      [sys.executable, "-m", "launch.convert_weights", "--model=dino",
       f"--input={tmp_path / 'dino'}", f"--output={tmp_path / 'dino.msgpack'}"],
      cwd=pathlib.Path(__file__).resolve().parents[1], capture_output=True, text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  vocab, merges = _vocab_and_merges()
  clip_dir = tmp_path / "clip"
  model = _tiny_clip(clip_dir, vocab[clip_tokenizer.EOS], len(vocab), vocab[clip_tokenizer.BOS], 77)
  (clip_dir / "vocab.json").write_text(json.dumps(vocab))
  (clip_dir / "merges.txt").write_text("".join(f"{a} {b}\n" for a, b in merges))
  embedders = metrics.Embedders.load(str(tmp_path / "dino.msgpack"), str(clip_dir), batch_size=2)

  texts = PROMPTS[:5]
  hf_ids = transformers.CLIPTokenizer.from_pretrained(clip_dir)(
      texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
  rng = np.random.RandomState(2)
  images = [rng.randint(0, 256, (40, 57, 3), np.uint8), rng.randint(0, 256, (32, 32, 3), np.uint8),
            rng.randint(0, 256, (64, 48, 3), np.uint8)]
  processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                 crop_size={"height": 32, "width": 32})
  clip_pixels = processor(images=images, return_tensors="pt")["pixel_values"]
  dino_pixels = dino.preprocess(images, embedders.dino_config).transpose(0, 3, 1, 2)
  dino_pixels = torch.from_numpy(dino_pixels)
  with torch.no_grad():
    want_text = model.get_text_features(**hf_ids)
    want_image = model.get_image_features(pixel_values=clip_pixels)
    want_dino = vit(pixel_values=dino_pixels).last_hidden_state[:, 0].numpy()
  want_text, want_image = (getattr(x, "pooler_output", x).numpy() for x in (want_text, want_image))
  got = embedders.embed_images(images)
  np.testing.assert_allclose(embedders.embed_texts(texts), want_text, atol=1e-4, rtol=0)
  np.testing.assert_allclose(got.clip, want_image, atol=1e-4, rtol=0)
  np.testing.assert_allclose(got.dino, want_dino, atol=1e-4, rtol=0)
