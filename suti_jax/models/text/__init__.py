"""The frozen T5 v1.1 text encoder: module, tokenizers, checkpoint conversion."""

from suti_jax.models.hf_checkpoint import CheckpointError
from suti_jax.models.hf_checkpoint import read_checkpoint
from suti_jax.models.text.convert import config_from_hf
from suti_jax.models.text.convert import hf_to_params
from suti_jax.models.text.convert import load_hf_encoder
from suti_jax.models.text.encoder import load_text_encoder
from suti_jax.models.text.encoder import precompute_embeddings
from suti_jax.models.text.encoder import TextEncoder
from suti_jax.models.text.t5 import init_t5_params
from suti_jax.models.text.t5 import T5Encoder
from suti_jax.models.text.tokenizers import build_tokenizer
from suti_jax.models.text.tokenizers import ByteTokenizer
from suti_jax.models.text.tokenizers import SentencePieceTokenizer
from suti_jax.models.text.tokenizers import Tokenizer
from suti_jax.models.text.weights import abstract_params
from suti_jax.models.text.weights import restore_params
from suti_jax.models.text.weights import save_params
