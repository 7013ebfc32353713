"""A synthetic "web" of image-text pairs with product-page URLs, and a caption dataset.

URL clusters mostly show one subject, largely in studio shots (`PRODUCT_SHOTS`); some
mix subjects, carry off-subject images or noisy captions, or are singletons, so the
pipeline filters work.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from suti_jax.data.synthetic import prompts
from suti_jax.data.synthetic import subjects as subjects_lib
# The package re-exports the function `render`, which shadows the module name.
from suti_jax.data.synthetic.render import render
from suti_jax.data.synthetic.scene import SKILLS, Scene

# Share of each cluster kind; counts are exact (largest remainder), see `kind_counts`.
CLUSTER_KINDS: dict[str, float] = {
    "single_subject": 0.5,     # One subject in varied scenes: what the pipeline wants.
    "off_subject": 0.15,       # One subject plus banners / other products.
    "noisy_captions": 0.15,    # One subject; some captions are boilerplate.
    "mixed_subjects": 0.1,     # A category page: several subjects.
    "singleton": 0.1,          # A single image: too small to be a cluster.
}
NOISE_CAPTIONS = ("free shipping on orders over $50", "click to enlarge", "IMG_0423.JPG",
                  "best seller", "limited time offer", "image not available")
_CATEGORY_SLUGS = ("sale", "new-arrivals", "gifts", "clearance", "bestsellers")


@dataclasses.dataclass(frozen=True, eq=False)
class WebPair:
  """One web image-text pair.

  Attributes:
    url: the image URL (host/path noise included: 'www.', case, query, fragment).
    image: uint8 [H, W, 3].
    caption: the alt text.
    true_subject_id: the subject shown ('' for a banner); ground truth for tests
      and evaluation only; the pipeline must not use it except in the clearly
      named oracle renderer.
    cluster_kind: one of `CLUSTER_KINDS` (ground truth).
  """

  url: str
  image: np.ndarray
  caption: str
  true_subject_id: str
  cluster_kind: str


def kind_counts(num_clusters: int) -> dict[str, int]:
  """Exact number of clusters of each kind for `num_clusters` (largest remainder)."""
  raw = {k: w * num_clusters for k, w in CLUSTER_KINDS.items()}
  counts = {k: int(np.floor(v)) for k, v in raw.items()}
  by_remainder = sorted(raw, key=lambda k: (-(raw[k] - counts[k]), list(raw).index(k)))
  for k in by_remainder[:num_clusters - sum(counts.values())]:
    counts[k] += 1
  return counts


# What a product page's photos show: mostly studio shots, from the front or from
# another side, and now and then the product in a scene, a style or a variant. A
# same-cluster target then looks much like its exemplars, which is why SuTI v1
# (targets from the cluster itself) learned to copy.
PRODUCT_SHOTS: dict[str, float] = {"plain": 0.5, "novel_view": 0.25, "other_skill": 0.25}


def _random_scene(rng: np.random.Generator, subject: subjects_lib.Subject) -> Scene:
  # The caption corpus: a quarter plain shots, the rest one skill each.
  if rng.random() < 0.25:
    return Scene()
  return prompts.random_scene(str(rng.choice(SKILLS)), rng, subject)


def product_shot(rng: np.random.Generator, subject: subjects_lib.Subject) -> Scene:
  """A web photo's scene, drawn by `PRODUCT_SHOTS`."""
  kind = str(rng.choice(list(PRODUCT_SHOTS), p=list(PRODUCT_SHOTS.values())))
  if kind == "plain":
    return Scene()
  if kind == "novel_view":
    return prompts.random_scene("novel_view", rng, subject)
  others = [s for s in SKILLS if s != "novel_view"]
  return prompts.random_scene(str(rng.choice(others)), rng, subject)


def _url(rng: np.random.Generator, shop: int, slug: str, index: int) -> str:
  host = str(rng.choice([f"shop-{shop}.example.com", f"www.shop-{shop}.example.com",
                         f"Shop-{shop}.Example.com"]))
  suffix = str(rng.choice(["", "", "?v=2", "?size=large", "#zoom"]))
  return f"https://{host}/products/{slug}/img{index}.jpg{suffix}"


def _pair(rng, subject, size_px, url, kind, caption=None) -> WebPair:
  scene = product_shot(rng, subject)
  image = render(subject, scene, size_px)
  if caption is None:
    caption = prompts.write_caption(subject, scene, rng)
  return WebPair(url, image, caption, subject.subject_id, kind)


def _banner(rng: np.random.Generator, size_px: int, url: str, kind: str) -> WebPair:
  # A banner: a background with no subject, captioned with shop boilerplate.
  background = str(rng.choice(["beach", "park", "night", "brick"]))
  empty = subjects_lib.Subject("", "", ())
  image = render(empty, Scene(background=background), size_px)
  return WebPair(url, image, str(rng.choice(NOISE_CAPTIONS)), "", kind)


def generate_web_pairs(num_clusters: int, seed: int, size_px: int,
                       images_per_cluster: tuple[int, int] = (4, 7)) -> list[WebPair]:
  """Generates the synthetic web, cluster by cluster; deterministic per seed.

  Args:
    num_clusters: URL clusters to make; kinds follow `kind_counts(num_clusters)`.
    seed: the random seed.
    size_px: image size.
    images_per_cluster: inclusive range of on-subject images per non-singleton cluster.

  Returns:
    The pairs, grouped by cluster in generation order.
  """
  rng = np.random.default_rng([seed, 0x3EB])
  kinds = [k for k, n in kind_counts(num_clusters).items() for _ in range(n)]
  kinds = [kinds[i] for i in rng.permutation(num_clusters)]
  subject_seeds = rng.choice(1_000_000, size=4 * num_clusters, replace=False)
  pairs: list[WebPair] = []
  for c, kind in enumerate(kinds):
    shop = c // 3 + 1  # Several clusters per shop: the host alone is not a cluster.
    subject = subjects_lib.make_subject(int(subject_seeds[4 * c]))
    n = int(rng.integers(images_per_cluster[0], images_per_cluster[1] + 1))
    if kind == "mixed_subjects":
      slug = f"{rng.choice(_CATEGORY_SLUGS)}-{c}"
      others = [subjects_lib.make_subject(int(s)) for s in subject_seeds[4 * c:4 * c + 4]]
      for i in range(n):
        pairs.append(_pair(rng, others[i % 4], size_px, _url(rng, shop, slug, i), kind))
      continue
    slug = f"{subject.class_noun}-{rng.integers(1000, 10000)}"
    if kind == "singleton":
      n = 1
    for i in range(n):
      noisy = kind == "noisy_captions" and i % 2 == 1
      caption = str(rng.choice(NOISE_CAPTIONS)) if noisy else None
      pairs.append(_pair(rng, subject, size_px, _url(rng, shop, slug, i), kind, caption))
    if kind == "off_subject":
      pairs.append(_banner(rng, size_px, _url(rng, shop, slug, n), kind))
      stray = subjects_lib.make_subject(int(subject_seeds[4 * c + 1]))
      pairs.append(_pair(rng, stray, size_px, _url(rng, shop, slug, n + 1), kind))
  return pairs


def caption_dataset(seed: int, size_px: int, subject_seeds: Sequence[int] = range(1000),
                    num_examples: int | None = None) -> Iterator[tuple[np.ndarray, str]]:
  """(image, caption) pairs for training the plain text-to-image model.

  Args:
    seed: the random seed; the stream is deterministic per seed.
    size_px: image size.
    subject_seeds: the subjects to draw from (keep evaluation subjects out).
    num_examples: how many to yield; None = forever.

  Yields:
    (uint8 [size_px, size_px, 3], caption such as 'a red and blue toy on a beach').
  """
  rng = np.random.default_rng([seed, 0xCA9])
  count = 0
  while num_examples is None or count < num_examples:
    subject = subjects_lib.make_subject(int(rng.choice(subject_seeds)))
    scene = _random_scene(rng, subject)
    yield render(subject, scene, size_px), prompts.write_caption(subject, scene, rng)
    count += 1
