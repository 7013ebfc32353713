"""The demo's library pieces: the resumable stage runner, the synthetic world's
held-out evaluation set, the evaluation and report, and the shipped-checkpoint
install. The recipe that wires them to the trainer and the Beam pipeline is an
application: `launch/demo/recipe.py`.
"""
