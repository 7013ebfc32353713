"""Optional last stage: the frozen T5's embeddings of every prompt and caption, added
to ICL / caption TFRecords for `data.precomputed_embeddings`. Each file is rewritten
under its name, records in order; only the `embedding/*` fields change.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import apache_beam as beam
import tensorflow as tf
from apache_beam.options.pipeline_options import PipelineOptions

from data_pipeline import counters
from data_pipeline import write
from suti_jax.config import TextEncoderConfig
from suti_jax.data import records
from suti_jax.models.text import encoder as encoder_lib

# (input file, index in it, serialised record).
Record = tuple[str, int, bytes]


def _read_file(path: str) -> Iterable[Record]:
  for index, (_, record) in enumerate(records.read_tfrecords([path])):
    yield path, index, record


def embed_records(encoder: encoder_lib.TextEncoder, batch: Sequence[Record],
                  batch_size: int) -> list[Record]:
  """Every record of `batch` with its texts' embeddings set (one encoder pass).

  Args:
    encoder: the frozen T5 with its tokenizer.
    batch: records of any files.
    batch_size: texts per device call (the last call is padded).

  Returns:
    The records in the same order, each with `embedding/*` fields written.
  """
  fields = [records.embedded_texts(record, source=records.record_source(path, index))
            for path, index, record in batch]
  texts = [t for f in fields for value in f.values()
           for t in ([value] if isinstance(value, str) else value)]
  embeddings = encoder_lib.precompute_embeddings(encoder, texts, batch_size)
  out, start = [], 0
  for (path, index, record), f in zip(batch, fields):
    values = {}
    for key, value in f.items():
      n = 1 if isinstance(value, str) else len(value)
      emb = embeddings[start:start + n]
      values[key] = emb[0] if isinstance(value, str) else emb
      start += n
    out.append((path, index, records.with_embeddings(record, values)))
  counters.count("embed/records", len(batch))
  counters.count("embed/texts", len(texts))
  return out


class _EmbedFn(beam.DoFn):
  """Batches of records -> the same records with embeddings; T5 loads once per worker."""

  def __init__(self, text: TextEncoderConfig, batch_size: int):
    self._text = text
    self._batch_size = batch_size
    self._encoder = None

  def setup(self):
    self._encoder = encoder_lib.load_text_encoder(self._text)

  def process(self, batch: list[Record]):
    yield from embed_records(self._encoder, batch, self._batch_size)


def _write_file(element: tuple[str, Iterable[tuple[int, bytes]]], output_dir: str) -> int:
  path, indexed = element
  ordered = sorted(indexed)
  with tf.io.TFRecordWriter(os.path.join(output_dir, os.path.basename(path))) as writer:
    for _, record in ordered:
      writer.write(record)
  return len(ordered)


class EmbedText(beam.PTransform):
  """PCollection[input file path] -> output files with embeddings; outputs record counts.

  Texts are encoded `batch_size` at a time by `text.weights_path`'s T5
  (restored straight into device shards on each worker).
  """

  def __init__(self, text: TextEncoderConfig, output_dir: str, batch_size: int):
    super().__init__()
    if not text.weights_path:
      raise ValueError("EmbedText needs text.weights_path: the T5 checkpoint training will name")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self._text, self._output_dir, self._batch_size = text, output_dir, batch_size

  def expand(self, paths):
    return (paths
            | "Read" >> beam.FlatMap(_read_file)
            | "Spread" >> beam.Reshuffle()
            | "Batch" >> beam.BatchElements(min_batch_size=self._batch_size,
                                            max_batch_size=self._batch_size)
            | "Embed" >> beam.ParDo(_EmbedFn(self._text, self._batch_size))
            | "ByFile" >> beam.Map(lambda r: (r[0], (r[1], r[2])))
            | "Group" >> beam.GroupByKey()
            | "Write" >> beam.Map(_write_file, self._output_dir))


def run_pipeline(pattern: str, output_dir: str, text: TextEncoderConfig, batch_size: int,
                 beam_args: Sequence[str] = ()) -> dict[str, int]:
  """Embeds every record of the files matching `pattern` into `output_dir`.

  Args:
    pattern: glob of ICL or caption TFRecord files (distinct base names).
    output_dir: created if missing; must differ from the input folders.
    text: tokenizer, architecture, max_length and weights_path of the T5.
    batch_size: texts per encoder call.
    beam_args: Beam PipelineOptions flags (runner and its options).

  Returns:
    `files` and the pipeline's counters `embed/records`, `embed/texts`.
  """
  files = sorted(tf.io.gfile.glob(pattern))
  if not files:
    raise FileNotFoundError(f"--input {pattern!r} matches no files")
  names = [os.path.basename(f) for f in files]
  if len(set(names)) != len(names):
    raise ValueError(f"--input {pattern!r}: files share base names; outputs would collide")
  output_dir = os.path.abspath(output_dir)
  if any(os.path.dirname(os.path.abspath(f)) == output_dir for f in files):
    raise ValueError(f"--output {output_dir!r} holds the input files; pick another folder")
  tf.io.gfile.makedirs(output_dir)
  p = beam.Pipeline(options=PipelineOptions(list(beam_args)))
  _ = p | "Files" >> beam.Create(files) | "EmbedText" >> EmbedText(text, output_dir, batch_size)
  result = p.run()
  result.wait_until_finish()
  values = write.counters(result)
  return {"files": len(files), **{k: v for k, v in values.items() if k.startswith("embed/")}}
