"""Evaluation machinery behind the ``evaluate`` stage.

  compare.py     base vs fine-tuned on the same prompts: what the evaluate stage calls (EvalJob)
  spec.py        the ``eval`` config group's schema
  metrics.py     every metric, one decorated function each (@metric): the registry eval.metrics is checked against
  generation.py  batched greedy generation with the training template's stops; perplexity
  numeric.py     expected-value readout of numeric answers
  embeddings.py  cosine similarity (all-MiniLM-L6-v2, or a TF-IDF fallback)
  suites.py      behaviour suites (suites/*.yaml): format, fact preservation, safety
  harness.py     EleutherAI lm-eval in-process; a local offline task in lm_eval_tasks/
Nothing heavy is imported here: the eval schema imports this package during validation.
"""
