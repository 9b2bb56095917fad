"""Reinforcement learning from rewards: the GRPO loop the ``train_grpo`` stage runs.

It sits above ``engine.reward`` (what a completion is worth) and beside ``engine.env`` (the
same rewards as a Gymnasium environment); see docs/rl.md.

  spec.py       the ``grpo`` group's schema (sampling and update knobs)
  grpo.py       the loop: set_up / grpo_step / finish, checkpoints as engine/train's
  sampling.py   the seeded prompt stream and one step's groups of sampled completions
  objective.py  group-normalised advantages, completion log-probs, the clipped surrogate + k3 KL
"""
