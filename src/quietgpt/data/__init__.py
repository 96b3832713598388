"""Tokens: tokenizers (tokenizers.py: char, byte, GPT-2 BPE, the synthetic task's), the embedded synthetic
recall task with its analytic irreducible loss (synthetic.py), and the sources prepared into cached token
memmaps plus the batch sampler (sources.py: synthetic, Shakespeare, text files, hf:NAME)."""
