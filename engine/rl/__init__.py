"""Reinforcement learning from rewards: the GRPO loop the ``train_grpo`` stage runs.

It sits above ``engine.reward`` (what a completion is worth) and beside ``engine.env`` (the
same rewards as a Gymnasium environment); see docs/preference.md.
"""
