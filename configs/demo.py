"""The embedded-default demo recipe: synthetic web -> cascade -> judges -> ICL groups
(experts v2, same-cluster v1) -> two SuTI models -> held-out evaluation -> report.

  python -m launch.demo          # `make demo`: 19-24 min measured on a fresh clone,
                                 # install included, on a 2-core Intel VM (README); the v2
                                 # experts and SuTI v2 are the critical path
  python -m launch.demo --config=configs/demo.py:small   # the end-to-end test size
  python -m launch.demo --config=configs/demo.py:full --workdir=workdirs/demo_full \
      --report_dir=reports/demo_full                     # the longer recipe (41 min on
                                                         # the same VM, venv built)
"""

import ml_collections

from configs import common
from configs import imagen_base64
from configs import imagen_sr256
from configs import suti_base64

# The `get_config` arguments this file accepts (`:small`, `:full`).
OPTIONS = ("small", "full")


# Byte tokens the tiny T5 reads per text (eos included). The world's prompts and
# captions are at most 83 bytes; the tiny configs' 16 would keep 'the purple, bla'
# of 'the purple, black and teal box on a beach', so no stage could follow the text.
TEXT_BYTES = 96
# Steps of the shipped base checkpoint (pretrained/demo_base, 2 idle cores: see README).
BASE_STEPS = 6000
# SuTI training steps of the two models. In-context copying appears late, and
# SuTI v2, which learns from the experts' softer renders, later than v1: held-out
# subject fidelity at 600 / 1200 / 1800 / 2400 steps was v2 0.179 / 0.232 / 0.320 /
# 0.434 (REPORT.md, 60-step experts' targets; on the 150-step experts' targets v2
# scores 0.212 / 0.365 / 0.550 / 0.568 at 675 / 1350 / 2025 / 2700 steps); v1 0.159 /
# 0.265 / 0.404 / 0.393, flat after 1800. v1 stops
# there, which leaves the 2 cores to v2, the critical path. v2 trains 2700 steps: at
# 2400 its same-subject rate sat at the 0.6 bar (0.617 in one run, 0.583 in the next,
# whose targets the experts rendered with the last bits of their numerics changed).
# The learning rate stays constant: a cosine decay to 0 over 2400 / 2100 steps gave
# SuTI v2 0.365 / 0.329 held-out subject fidelity on the 12 validation subjects,
# against 0.492 at 2700 constant steps.
SUTI_STEPS = {"v2": 2700, "v1": 1800}
# `:full`: more web subjects is the lever that still pays (224 clusters lifted SuTI
# v1 from 0.45 to 0.56 subject fidelity at 2000 steps), and more groups let SuTI
# train longer before it overfits (v2 flattened after 1500 steps on 469 groups;
# both with 16-byte text). With the default's experts, 480 clusters x 4000 steps gave
# SuTI v2 0.644 / 0.825 / 0.058 on the report's subjects (subject fidelity / same-subject
# rate / text fidelity; the default 0.581 / 0.767 / 0.053, DreamBooth 0.573 / 0.750 / 0.069).
FULL_CLUSTERS = 480
FULL_SUTI_STEPS = 4000


def _stage(parent, steps: int, batch_size: int, learning_rate: float):
  """A tiny stage config trained for `steps`, saving only at the end."""
  c = parent.get_config("tiny")
  c.text.max_length = TEXT_BYTES
  c.train.total_steps = steps
  c.train.batch_size = batch_size
  c.train.checkpoint_every_steps = steps
  c.train.keep_checkpoints = 1
  c.train.log_every_steps = max(1, steps // 10)
  c.optimizer.learning_rate = learning_rate
  c.optimizer.warmup_steps = min(50, steps // 10)
  c.data.shuffle_buffer = 256
  # The demo's data sets are small: read once, batched from memory.
  c.data.cache = True
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  opts = common.parse_arg(arg, OPTIONS)
  small = "small" in opts
  full = "full" in opts
  if small and full:
    raise ValueError("configs/demo.py: 'small' and 'full' are exclusive")
  num_clusters = 12 if small else FULL_CLUSTERS if full else 160
  suti_steps = ({"v2": 10, "v1": 10} if small else
                {"v2": FULL_SUTI_STEPS, "v1": FULL_SUTI_STEPS} if full else SUTI_STEPS)
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Stages run two at a time where the dependency graph allows: XLA's CPU kernels
  # for these small models keep about one core busy each.
  c.workers = 2
  # Synthetic world. Web images are 32 px (the SR target); the base trains at 16.
  # Hundreds of web clusters give SuTI many subjects to learn in-context copying
  # from; the held-out subjects never appear in any training.
  c.world = ml_collections.ConfigDict(dict(
      num_clusters=num_clusters, web_size_px=32, image_size=16,
      num_heldout_subjects=2 if small else 12, min_exemplars=3, max_exemplars=5,
      prompts_per_skill=1 if small else 2))
  # The text-to-image base is pretrained on a broad caption corpus (subjects
  # disjoint from the held-out ones), as Imagen is before SuTI's apprenticeship.
  # Its checkpoint ships in `base_pretrained`; the stage installs it when the
  # recorded fingerprint matches this config, else (or with --retrain=base) trains.
  c.corpus = ml_collections.ConfigDict(dict(
      num_subjects=64 if small else 1500, num_examples=256 if small else 12000, seed=1))
  c.base = _stage(imagen_base64, steps=20 if small else BASE_STEPS,
                  batch_size=8 if small else 64, learning_rate=1e-3)
  c.base.optimizer.ema_decay = 0.999
  c.base_pretrained = "" if small else "pretrained/demo_base"
  # The SR stage only shows that the cascade trains (evaluation runs at the base
  # resolution), so it gets a short run. It ships pretrained too (`sr_pretrained`,
  # installed when the fingerprint of this config and web matches): trained in the
  # demo it took 114 s, 80 s of them compiling, beside SuTI v2's training, the
  # critical path.
  c.sr = _stage(imagen_sr256, steps=10 if small else 60, batch_size=8,
                learning_rate=1e-3)
  c.sr_pretrained = "" if small else "pretrained/demo_sr"
  # The SuTI models' shared config; `suti_steps` sets each one's training steps.
  c.suti = _stage(suti_base64, steps=suti_steps["v2"],
                  batch_size=8 if small else 16, learning_rate=1e-3)
  c.suti_steps = ml_collections.ConfigDict(suti_steps)
  # Exemplar attention reads the exemplars' image tokens only. Their captions still
  # condition each exemplar's encoding (the down stack's text attention), but K x 96
  # byte tokens more per exemplar-attention layer made the SuTI step 1.25x slower.
  c.suti.model.exemplar.include_caption_tokens = False
  # The prompt's and the K captions' T5 embeddings are written into the groups
  # once (the recipe runs `launch.embed_text`'s stage with the base's T5) instead
  # of encoded in every step: in-step encoding took 9% of the SuTI step's op time.
  c.suti.data.precomputed_embeddings = True
  # The encoded exemplars are constants of the step (`encoder_gradients`): the shared
  # downstack learns from generation, the exemplar attention from the tokens it
  # reads, and the step skips the backward pass of K_max downstack passes per
  # example: 1.35x the step's speed alone on 2 cores (bench.exemplar_gradients, AMD
  # VM: 229 vs 310 ms). SuTI v2 on the report's subjects at 2400 steps, subject /
  # same-subject / text fidelity: 0.438 / 0.600 / 0.119 with gradients through the
  # exemplars, 0.434 / 0.617 / 0.119 without.
  c.suti.model.exemplar.encoder_gradients = False
  # Interleaved guidance weighs the exemplars 3x and the text 3x. Chosen with SuTI
  # v2 on 12 validation subjects (the 12 held-out seeds after the report's, which
  # the report never scores): text / exemplar 1.35 / 3, 2 / 3, 3 / 3 and 4 / 4 gave
  # text fidelity 0.082 / 0.144 / 0.156 / 0.156 at subject fidelity 0.581 / 0.565 /
  # 0.547 / 0.543, same-subject rates 0.78-0.80 throughout. Exemplar guidance 3
  # instead of 1.35 had lifted subject fidelity by 0.08 (v2) and 0.13 (v1).
  c.suti.sampling.text_guidance_scale = 3.0
  c.suti.sampling.exemplar_guidance_scale = 3.0
  # Four saved points per SuTI run (the recipe sets the interval per model): the
  # report's learning curve.
  c.suti.train.keep_checkpoints = 4
  # DreamBooth experts, the pipeline's teachers and the baseline alike:
  # `ExpertConfig.tiny()` with these fields replaced. They fine-tune 150 steps, what
  # the budget affords: on the 12 validation subjects an expert's subject fidelity /
  # text fidelity was 0.378 / 0.175 at 60 steps, 0.510 / 0.138 at 100, 0.563 / 0.111
  # at 150, 0.592 / 0.096 at 200 and 0.706 / 0.100 at 300 (DreamBooth trades the prompt
  # for the subject as it trains). Better teachers make a better apprentice: trained on
  # 60-step experts' targets, SuTI v2 scored 0.417 / 0.617 / 0.096 on the report's
  # subjects (subject fidelity / same-subject rate / text fidelity); on 150-step
  # experts' targets 0.568 / 0.758 / 0.061, with 1263 groups kept instead of 932. The
  # v2 pipeline's parts took 554-564 s instead of 307-309 s (fresh clone, Intel VM).
  # On CPU they train one at a time: vmapping experts makes XLA batch the convolutions over per-expert
  # kernels, and 12 experts x 20 steps took 14.9 s vmapped 12-wide, 11.4 s
  # 4-wide and 7.7 s one by one.
  # They render with text guidance 4 (the base samples at 1.35): fine-tuned on a few
  # images, an expert drifts from the prompt to its instance images. On held-out
  # subjects photographed in varied scenes that raised its text fidelity from 0.086
  # to 0.150 at the same subject fidelity (0.475 vs 0.469); guidance 8 gave 0.176
  # text at 0.409 subject.
  # Each expert trains on its images' own captions with the subject phrase replaced
  # by the identifier ('a sks badge on the beach'), so 'sks' binds to the subject and
  # not to its photos' backgrounds: on held-out subjects photographed in varied
  # scenes, subject / text fidelity 0.468 / 0.146 with 'a sks badge' for every
  # image, 0.491 / 0.204 with the captions.
  # `render_base_text_guidance` stays 0: the base's text direction at 0.5 / 1 moved the
  # validation subjects' experts from 0.563 / 0.111 (subject / text fidelity) to 0.502 /
  # 0.140 and 0.438 / 0.144, and renders that pass the subject judge and show a prompt
  # attribute from 11 to 13 and 13 of 120 (README).
  c.experts = ml_collections.ConfigDict(dict(
      num_steps=40 if small else 150, batch_size=2, learning_rate=2e-3,
      max_parallel_experts=1, render_guidance_scale=4.0, instance_captions=True,
      render_base_text_guidance=0.0))
  # Judges: trained on their own subjects (disjoint from web and held-out ones), on
  # 16 px renders read by a 32 px CNN. Held-out accuracy is in REPORT.md. Like the
  # base they depend on their own config only and ship pretrained
  # (`judges_pretrained`, installed when the fingerprint matches). 6000 subjects x
  # 8000 steps: held-out subject-pair accuracy 0.921 (150 other held-out subjects:
  # 0.913); 3000 x 4000 gave 0.877 (0.890), 3000 x 8000 0.895 (0.902). Training
  # them takes 27 min on the 2 cores.
  c.judges = ml_collections.ConfigDict(dict(
      image_size=16, num_subjects=24 if small else 6000, steps=20 if small else 8000,
      scenes_per_subject=8, num_heldout_subjects=4 if small else 24,
      batch_size=16 if small else 64, seed=7))
  c.judges_pretrained = "" if small else "pretrained/demo_judges"
  # Fidelity filter on the judges' scores: a target's subject cosine to its
  # exemplars must reach the subject judge's calibrated same-subject threshold
  # (0.34 for the shipped judges, REPORT.md), so SuTI v2 learns only from renders
  # the judge calls the subject. The small run's judges train for seconds and
  # score near chance: it keeps all.
  # The renderer takes `render_batch_size` clusters per call (class-prior images
  # are drawn once per call and class noun). An expert renders its cluster's
  # prompts in one sampler batch. 16 prompts per cluster instead of 8 gave SuTI v2
  # about twice the groups (931 kept vs 481) and lifted its held-out subject
  # fidelity from 0.377 to 0.468 (same-subject rate 0.558 to 0.608) at 2400 steps,
  # sampled with text guidance 1.35. The targets render with the evaluation's 8
  # DDIM steps instead of the base's 16, so the v2 pipeline took 493 s, not 461 s.
  # `v2_parts` > 1 runs the v2 pipeline as that many stages that share out its
  # render batches (`--num_parts`/`--part`), so its experts, the head of the critical
  # path, take both worker slots; the `icl_v2` stage merges their outputs into the
  # whole run's shards, byte for byte (`data_pipeline.merge_parts`), so SuTI v2
  # trains on exactly the groups of one stage. (Parts that split the clusters
  # before batching cut other render batches: other class-prior images and targets,
  # and SuTI v2 fell from 0.434 to 0.332 held-out subject fidelity.)
  # `recaption_targets` stays off: the 150-step experts show the prompt's modifiers in
  # 105 of 1263 kept targets, so recaptioned prompts are plain for 1121 groups, and
  # SuTI v2 trained on them scored 0.456 / 0.625 / 0.161 on the validation subjects
  # (subject fidelity / same-subject rate / text fidelity) against 0.562 / 0.767 / 0.144
  # on the prompts as written (report subjects: 0.457 / 0.675 / 0.128 vs 0.568 / 0.758 /
  # 0.061): text gained less than the subject lost.
  # `max_groups_per_subject` stays 0 (keep every passing target). Best-of-n instead, 48
  # prompts per cluster with each subject's 16 best-shown targets kept, gave 1950 groups
  # of which 402 show a prompt attribute (1263 and 142 as written), at 560 s instead of
  # 424 s per v2 part; SuTI v2 on the validation subjects scored 0.557 / 0.742 / 0.149
  # against 0.577 / 0.783 / 0.133: text again gained about what the subject lost.
  # In `:full` (6018 groups instead of 4045, parts 1459 / 1403 s instead of 1382 / 1289 s) SuTI
  # v2 scored 0.681 / 0.833 / 0.058 on the report's subjects against 0.644 / 0.825 / 0.058.
  c.pipeline = ml_collections.ConfigDict(dict(
      prompts_per_cluster=8 if small else 16, num_shards=2,
      min_subject_score=-1.0 if small else 0.34, min_text_score=0.0, recaption_targets=False,
      max_groups_per_subject=0,
      render_batch_size=4 if small else 12, render_steps=4 if small else 8,
      v2_parts=2))
  # Every method's held-out renders use one sampler (`eval.sampler`): DDIM at 6
  # steps. The judges' scores are flat over the step count at this size. On the 12
  # validation subjects (the held-out seeds after the report's), subject fidelity /
  # same-subject rate / text fidelity of SuTI v2 were 0.562 / 0.767 / 0.144 with DDIM
  # at 8 steps, 0.542 / 0.725 / 0.138 at 7 and 0.577 / 0.783 / 0.133 at 6, and 0.546 /
  # 0.750 / 0.144 with DPM-Solver++(2M) ('dpm_solver_2m') at 6; DreamBooth's 0.563 /
  # 0.750 / 0.111 (DDIM, 8), 0.545 / 0.733 / 0.119 (DDIM, 6) and 0.542 / 0.708 / 0.094
  # (DPM-Solver, 6); the text-only model's text fidelity 0.293 (8) and 0.285 (6). At 6
  # steps every method stays within the spread between neighbouring step counts, and
  # SuTI's render, linear in its steps, costs three quarters of 8 steps'. At 4 steps
  # (DPM-Solver) SuTI v2 held but DreamBooth lost 0.05 of subject fidelity on the
  # report's subjects (0.360 vs 0.413, 60-step experts), so the baseline's sampler
  # stops at 6.
  # Personalisation is timed on `timed_subjects` held-out subjects per method,
  # after a warm-up subject, with no other stage running.
  c.eval = ml_collections.ConfigDict(dict(
      sampler="ddim", sampling_steps=4 if small else 6, num_grid_subjects=2 if small else 4,
      timed_subjects=1 if small else 3))
  return c
