"""The synthetic subject world: procedural subjects, a prompt grammar over the five
SuTI skills, an exact renderer and a synthetic web of image-text pairs."""

from suti_jax.data.synthetic.prompts import (drop_modifiers, parse_prompt, random_scene,
                                            write_caption, write_prompt)
from suti_jax.data.synthetic.render import part_masks, render, subject_mask
from suti_jax.data.synthetic.scene import SKILLS, Scene
from suti_jax.data.synthetic.subjects import Part, Subject, make_subject
from suti_jax.data.synthetic.web import (PRODUCT_SHOTS, WebPair, caption_dataset,
                                        generate_web_pairs, product_shot)

__all__ = [
    "PRODUCT_SHOTS", "SKILLS", "Part", "Scene", "Subject", "WebPair", "caption_dataset", "drop_modifiers",
    "generate_web_pairs", "make_subject", "parse_prompt", "part_masks",
    "product_shot", "random_scene", "render", "subject_mask", "write_caption", "write_prompt",
]
