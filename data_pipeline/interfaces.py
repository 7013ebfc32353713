"""Old import path of the stage contract, kept only for `data_pipeline/read.py`.

The element types and model ABCs live in `suti_jax.data.pipeline_interfaces`, the
Beam counters in `data_pipeline.counters`.
TODO(#18): delete once read.py imports those two (it is being edited in parallel).
"""

# pylint: disable=unused-import
from data_pipeline.counters import DEAD_LETTER, NAMESPACE, count, dead_letter, stable_seed  # noqa: F401
from suti_jax.data.pipeline_interfaces import WebRecord  # noqa: F401
