"""Stage 2: group records into clusters by a normalised URL prefix (SuTI: by URL).

Normalisation lowercases the host, drops 'www.', strips query and fragment and keeps
`path_depth` directory segments; duplicate image URLs are dropped and counted.
"""

from __future__ import annotations

import dataclasses
import urllib.parse

import apache_beam as beam

from data_pipeline import counters
from suti_jax.data.pipeline_interfaces import Cluster, WebRecord


@dataclasses.dataclass(frozen=True)
class UrlRules:
  """How URLs map to cluster keys (flags `--url_path_depth`, `--keep_www`).

  Attributes:
    path_depth: directory segments of the path kept in the key (the file name
      is never kept): 2 turns '/products/<slug>/img1.jpg' into 'products/<slug>'.
    keep_www: keep a leading 'www.' (by default 'www.x.com' and 'x.com' merge).
  """

  path_depth: int = 2
  keep_www: bool = False


def normalise_url(url: str, rules: UrlRules = UrlRules()) -> str:
  """The URL without query and fragment, host lowercased, 'www.' dropped per rules."""
  parts = urllib.parse.urlsplit(url.strip())
  host = (parts.hostname or "").lower()
  if not rules.keep_www and host.startswith("www."):
    host = host[len("www."):]
  return f"{host}{parts.path}"


def cluster_key(url: str, rules: UrlRules = UrlRules()) -> str:
  """The cluster key of `url`: normalised host + the first `path_depth` folders.

  Args:
    url: the image URL.
    rules: the normalisation rules.

  Returns:
    e.g. 'shop-3.example.com/products/kite-1234'.
  """
  host, _, path = normalise_url(url, rules).partition("/")
  folders = [s for s in path.split("/") if s][:-1]
  return "/".join([host] + folders[:rules.path_depth])


def _to_cluster(element: tuple[str, list[WebRecord]], rules: UrlRules):
  key, members = element
  counters.count("cluster/clusters")
  unique: dict[str, WebRecord] = {}
  # Sorting first makes the kept duplicate the same on every run.
  for record in sorted(members, key=lambda r: (r.url, r.example_id)):
    url = normalise_url(record.url, rules)
    if url in unique:
      counters.count("drop/duplicate_url")
    else:
      unique[url] = record
  yield Cluster(key, tuple(unique.values()))


class ClusterByUrl(beam.PTransform):
  """PCollection[WebRecord] -> PCollection[Cluster], one per cluster key."""

  def __init__(self, rules: UrlRules = UrlRules()):
    super().__init__()
    self._rules = rules

  def expand(self, records):
    rules = self._rules
    return (records
            | "Key" >> beam.Map(lambda r: (cluster_key(r.url, rules), r))
            | "Group" >> beam.GroupByKey()
            | "ToCluster" >> beam.FlatMap(_to_cluster, rules))
