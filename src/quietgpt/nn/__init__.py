"""The model layer: the attention normalisers, the attention core with its exact fast paths, and the GPT.

    softmax.py    the normalisers as formulas (softmax_n, softmax1, clipped, softpick, sigmoid weights)
    kernels.py    fused kernels that return their log-sum-exp, and the exact LSE paths built on them
    chunked.py    the O(T)-memory blocked pass for normalisers without an LSE form (softpick, sigmoid)
    variants.py   the variant table: one `Variant` per normaliser (a new variant goes here)
    options.py    AttentionOptions: everything the core needs besides its tensors, checked once
    attention.py  the reference path, path selection, `attention()` and the QuietAttention module
    gates.py      the output gates (Bondarenko et al.'s per-head gate, Qiu et al.'s G1 gate)
    model.py      nanoGPT's GPT-2 with GPTConfig, observation taps and the paired initialisation

Nothing here imports from another quietgpt layer but errors.py.
"""
