"""Training: the loop (set-up / step / finish), checkpoints that survive crashes, loggers.

spec.py        the ``train`` config group's schema (defaults live in conf/train/default.yaml)
loop.py        the training loop the ``train`` and ``train_layered`` stages call
checkpoint.py  atomic, checksummed checkpoints and the resume decision
loggers.py     TensorBoard / MLflow / W&B sinks and the loss plot
"""
