"""CPU speed: kernels and memory tuning, each measured in bench/RESULTS.md and each with an off switch.

apply.py       ``speedups(model, ...)``: the one place a training run enters them (and undoes them)
attention.py   per-example attention for packed rows (train.packing)
dropout.py     sparse LoRA dropout (GapDropout)
fused_lora.py  one autograd node per LoRA layer on CPU (adapter.fused)
fused_ops.py   RMSNorm and rotary embeddings as single autograd nodes (train.fused_ops)
memory.py      glibc heap thresholds (train.keep_freed_memory) and the huge-page heap (ENGINE_HUGE_PAGES)
"""
