"""DreamBooth experts (the SuTI teachers), their pipeline renderer, and the fidelity
judges trained on the synthetic world."""
