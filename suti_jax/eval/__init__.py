"""DreamBench evaluation: DINO/CLIP embedders, weight converters, CLIP tokenizer, protocol
and reports (see dreambench.py for the protocol and launch/eval.py for the CLI).
"""
