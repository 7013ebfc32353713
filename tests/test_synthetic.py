"""Tests of the synthetic subject world: subjects, renderer, prompt grammar, web."""

import collections
import dataclasses
import urllib.parse

import numpy as np
import pytest

from suti_jax.data import synthetic as sy
from suti_jax.data.synthetic import scene as scene_lib
from suti_jax.data.synthetic import subjects as subjects_lib
from suti_jax.data.synthetic import web


def test_subjects_are_deterministic_and_distinct():
  assert sy.make_subject(123) == sy.make_subject("s000123")
  many = [sy.make_subject(i) for i in range(2000)]
  compositions = {tuple((p.shape, p.colour, p.texture, p.role) for p in s.parts) for s in many}
  # Discrete compositions rarely collide; sizes and angles tell those apart.
  assert len(compositions) > 0.99 * len(many)
  assert len({s.parts for s in many}) == len(many)
  assert {s.class_noun for s in many} == set(subjects_lib.CLASS_NOUNS)
  for s in many[:200]:
    assert s.parts[0].role == "body" and 2 <= len(s.parts) <= 3
    assert len(set(s.colours)) == len(s.parts)
  with pytest.raises(ValueError):
    sy.make_subject("dog")


@pytest.mark.parametrize("size_px", [16, 32, 64])
def test_render_is_exact_and_well_formed(size_px):
  subject = sy.make_subject(7)
  scene = sy.Scene(background="beach", accessory="hat")
  image = sy.render(subject, scene, size_px)
  assert image.shape == (size_px, size_px, 3) and image.dtype == np.uint8
  np.testing.assert_array_equal(image, sy.render(sy.make_subject(7), scene, size_px))
  # The subject is visible: a good share of pixels differ from the empty scene.
  empty = sy.render(subjects_lib.Subject("", "", ()), scene, size_px)
  assert (np.abs(image.astype(int) - empty).sum(-1) > 30).mean() > 0.05


def _plain(subject, size_px=32, **fields):
  return sy.render(subject, sy.Scene(**fields), size_px)


def test_recolour_changes_only_the_named_part():
  for seed in range(8):
    subject = sy.make_subject(seed)
    for part in subject.parts:
      colour = next(c for c in subjects_lib.COLOURS if c != part.colour)
      scene = sy.Scene(recolour=(part.role, colour))
      changed = np.any(sy.render(subject, scene, 32) != _plain(subject), axis=-1)
      mask = sy.part_masks(subject, scene, 32)[part.role]
      assert changed.any()
      assert not (changed & ~mask).any(), (seed, part.role)
  with pytest.raises(KeyError):
    subject = sy.make_subject(0)
    missing = next(r for r in subjects_lib.PART_ROLES if r not in [p.role for p in subject.parts])
    sy.render(subject, sy.Scene(recolour=(missing, "red")), 16)


@pytest.mark.parametrize("size_px", [16, 64])
def test_views_and_inversion(size_px):
  subject = sy.make_subject(11)
  plain = _plain(subject, size_px)
  np.testing.assert_array_equal(_plain(subject, size_px, view="mirrored"), np.fliplr(plain))
  np.testing.assert_array_equal(_plain(subject, size_px, style="inverted"), 255 - plain)
  assert not np.array_equal(_plain(subject, size_px, view="rotated"), plain)
  assert not np.array_equal(_plain(subject, size_px, view="upside_down"), plain)


def _centroid(subject, **fields):
  cover = sy.subject_mask(subject, sy.Scene(**fields), 32)
  rows, cols = np.indices(cover.shape)
  return (cover * rows).sum() / cover.sum(), (cover * cols).sum() / cover.sum()


def test_position_moves_the_centroid_and_scale_the_area():
  subject = sy.make_subject(3)
  row0, col0 = _centroid(subject)
  assert _centroid(subject, position="left")[1] < col0 - 3
  assert _centroid(subject, position="right")[1] > col0 + 3
  assert _centroid(subject, position="top")[0] < row0 - 3
  assert _centroid(subject, position="bottom")[0] > row0 + 3
  areas = [sy.subject_mask(subject, sy.Scene(scale=s), 32).sum() for s in ("small", "medium", "large")]
  assert areas[0] < 0.6 * areas[1] and areas[1] < 0.75 * areas[2]


def test_accessories_and_styles_change_the_stated_pixels():
  subject = sy.make_subject(5)
  plain = _plain(subject)
  framed = _plain(subject, accessory="frame")
  border = np.ones((32, 32), bool)
  border[2:-2, 2:-2] = False
  assert np.all(framed[border] != plain[border])
  np.testing.assert_array_equal(framed[4:-4, 4:-4], plain[4:-4, 4:-4])
  assert "hat" in sy.part_masks(subject, sy.Scene(accessory="hat"), 32)
  assert "badge" in sy.part_masks(subject, sy.Scene(accessory="badge"), 32)
  gray = _plain(subject, style="grayscale")
  assert np.all(gray[..., 0] == gray[..., 1]) and np.all(gray[..., 1] == gray[..., 2])
  pixel = _plain(subject, style="pixelated")
  np.testing.assert_array_equal(pixel[::4, ::4].repeat(4, 0).repeat(4, 1), pixel)
  # An outline leaves the inside of each part as background.
  empty = _plain(subjects_lib.Subject("", "", ()))
  outline = _plain(subject, style="outline")
  assert (outline == empty).all(-1).mean() > (plain == empty).all(-1).mean() + 0.02
  for background_name in scene_lib.BACKGROUNDS[1:]:
    assert not np.array_equal(_plain(subject, background=background_name), plain)


def test_prompt_round_trip_and_skills():
  rng = np.random.default_rng(0)
  for i in range(300):
    subject = sy.make_subject(i)
    skill = sy.SKILLS[i % len(sy.SKILLS)]
    scene = sy.random_scene(skill, rng, subject)
    assert scene.skills == (skill,)
    assert sy.parse_prompt(sy.write_prompt(subject, scene, rng)) == scene
    assert sy.parse_prompt(sy.write_caption(subject, scene, rng)) == scene
    if scene.recolour:
      assert subject.part(scene.recolour[0]).colour != scene.recolour[1]
  combined = sy.Scene(background="snow", position="left", scale="small", style="sepia",
                      view="upside_down", recolour=("head", "teal"), accessory="badge")
  assert sy.parse_prompt(sy.write_prompt(sy.make_subject(1), combined, rng)) == combined
  assert sy.parse_prompt("A photo of the toy WEARING A HAT") == sy.Scene(accessory="hat")
  with pytest.raises(ValueError):
    sy.parse_prompt("a toy on the left on the right")


def test_drop_modifiers_removes_exactly_the_named_fields():
  rng = np.random.default_rng(1)
  combined = sy.Scene(background="snow", position="top", scale="small", style="sepia",
                      view="upside_down", recolour=("head", "orange"), accessory="hat")
  fields = ("background", "position", "scale", "style", "view", "recolour", "accessory")
  for i in range(200):
    prompt = sy.write_prompt(sy.make_subject(i), combined, rng,
                             subject_ref="orange and blue toy" if i % 2 else None)
    dropped = {f for f in fields if rng.random() < 0.5}
    expected = dataclasses.replace(combined, **{f: getattr(sy.Scene(), f)
                                                for f in dropped})
    assert sy.parse_prompt(sy.drop_modifiers(prompt, dropped)) == expected, prompt
  # 'with a top hat' stays when the position goes; the article follows the next word.
  assert (sy.drop_modifiers("a small orange toy with a top hat at the top", {"scale", "position"})
          == "an orange toy with a top hat")
  assert sy.drop_modifiers("a photo of the toy on a beach", set()) == "a photo of the toy on a beach"
  with pytest.raises(ValueError, match="colour"):
    sy.drop_modifiers("a toy", {"colour"})


def test_web_pairs_have_the_stated_mix():
  pairs = sy.generate_web_pairs(20, seed=3, size_px=16)
  again = sy.generate_web_pairs(20, seed=3, size_px=16)
  assert [p.url for p in pairs] == [p.url for p in again]
  assert all(np.array_equal(a.image, b.image) for a, b in zip(pairs, again))
  clusters = collections.defaultdict(list)
  for p in pairs:
    parsed = urllib.parse.urlsplit(p.url)
    host = parsed.hostname.removeprefix("www.")
    clusters[(host, parsed.path.rsplit("/", 1)[0])].append(p)
  assert len(clusters) == 20
  kinds = collections.Counter(members[0].cluster_kind for members in clusters.values())
  assert kinds == web.kind_counts(20) == {"single_subject": 10, "off_subject": 3,
                                          "noisy_captions": 3, "mixed_subjects": 2,
                                          "singleton": 2}
  for members in clusters.values():
    kind = members[0].cluster_kind
    ids = collections.Counter(p.true_subject_id for p in members)
    if kind == "singleton":
      assert len(members) == 1
    elif kind == "mixed_subjects":
      assert len(ids) >= 3
    elif kind == "off_subject":
      assert len(ids) == 3 and "" in ids
    else:
      assert len(ids) == 1 and len(members) >= 4
    noisy = sum(p.caption in web.NOISE_CAPTIONS for p in members)
    assert (noisy > 0) == (kind in ("noisy_captions", "off_subject"))


def test_product_shots_are_mostly_studio_shots():
  """Web photos follow `PRODUCT_SHOTS`: half plain, a quarter another view, a quarter
  one of the other skills (so same-cluster targets resemble their exemplars)."""
  rng = np.random.default_rng(0)
  subject = sy.make_subject(5)
  draws = 4000
  kinds = collections.Counter()
  for _ in range(draws):
    skills = sy.product_shot(rng, subject).skills
    assert len(skills) <= 1
    kinds[skills[0] if skills else "plain"] += 1
  assert abs(kinds.pop("plain") / draws - 0.5) < 0.03
  assert abs(kinds.pop("novel_view") / draws - 0.25) < 0.03
  assert set(kinds) == set(sy.SKILLS) - {"novel_view"}
  assert abs(sum(kinds.values()) / draws - 0.25) < 0.03


def test_caption_dataset_describes_the_image():
  examples = list(sy.caption_dataset(seed=1, size_px=16, subject_seeds=range(50), num_examples=20))
  assert len(examples) == 20
  nouns = set(subjects_lib.CLASS_NOUNS)
  for image, caption in examples:
    assert image.shape == (16, 16, 3)
    assert nouns & set(caption.split())
    assert any(c in caption.split() for c in subjects_lib.COLOURS)
  again = list(sy.caption_dataset(seed=1, size_px=16, subject_seeds=range(50), num_examples=20))
  assert [c for _, c in examples] == [c for _, c in again]
