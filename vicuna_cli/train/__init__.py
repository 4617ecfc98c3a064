"""Training: `vicuna train sft` (multi-turn SFT with assistant-only loss) and `inspect-data`.

config (TrainConfig) → dataset (conversations) → labels (masks) → packing (step plan, batches)
→ modeling (model, LoRA, loss module) → loop (the one training loop) → checkpoint / rundir.
"""
