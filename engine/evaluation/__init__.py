"""Evaluation machinery behind the ``evaluate`` and ``report`` stages.

  generation.py  batched greedy generation with the training template's stops; perplexity
  embeddings.py  cosine similarity (all-MiniLM-L6-v2, or a TF-IDF fallback)
  suites.py      behaviour suites (suites/*.yaml): format, fact preservation, safety
  harness.py     EleutherAI lm-eval in-process; a local offline task in lm_eval_tasks/
  html.py        the self-contained report.html (plots inlined)
Pure metric functions are in engine/metrics.py. Nothing heavy is imported here: the eval
schema imports this package during config validation.
"""
