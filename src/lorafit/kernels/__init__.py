"""Pure tensor operations and autograd functions: the math of lorafit's lean paths, with no model knowledge.

Each module holds one kernel family (the LoRA branch and its shared-input group, the dropout hash, RMSNorm,
RoPE, SiLU·up, chunked linear cross-entropy, CPU attention on fp32 copies, matmul precision). They take plain
tensors and the run's :class:`lorafit.options.RuntimeOptions`; which modules of which model use them is decided
above, in :mod:`lorafit.lora` and :mod:`lorafit.patches`.
"""
