"""Continuous-time diffusion: schedules, objectives, losses, guidance, samplers
and the cascade. Model-agnostic: everything takes predict-fn callables.
"""

from suti_jax.diffusion.cascade import CascadeStage, sample_cascade
from suti_jax.diffusion.guidance import BatchedPredictFn, guided_prediction
from suti_jax.diffusion.loss import (condition_dropout, denoising_loss,
                                     noise_augment)
from suti_jax.diffusion.sampling import sample
from suti_jax.diffusion.schedule import (Schedule, alpha_sigma, make_schedule,
                                         register_schedule)
from suti_jax.diffusion.thresholding import apply_threshold, dynamic_threshold
