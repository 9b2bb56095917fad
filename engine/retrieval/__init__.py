"""The ``retrieval`` group: a FAISS index over a corpus, and its passages put into prompts.

Kinds (``retrieval=<preset>``, one YAML each in conf/retrieval/):
  none     off: nothing is embedded, prompts are the data group's own (the default)
  flat_ip  exact inner product on L2-normalised vectors (cosine): small and mid-size corpora
  flat_l2  exact Euclidean distance (the seed's "L2 over mean-pooled hidden states")
  hnsw     a graph index: sub-millisecond approximate search for large corpora (M, ef_search)
  ivf_pq   inverted lists + product quantisation: compact memory for very large corpora
           (trained on a sample; nprobe lists searched per query)

The package takes plain arguments (specs, texts, models, paths) and knows nothing of stages:
  spec.py       the group's schema (light: validation imports it)
  embedders.py  EMBEDDERS: minilm, llm_mean_pool, tfidf -> L2-normalised float32 vectors
  corpus.py     passages from a JSONL file, a documents folder, or the training examples
  index.py      FAISS index kinds, streamed build, save/load with meta.json, search with exclusions
  prompts.py    top-k passages into each prompt through ``retrieval.template``, cached per split
  metrics.py    recall@k, MRR, nDCG@k on labelled queries
  run.py        a run's retrieval: ``open_index`` (load, reuse or build; score), ``add_passages``
The build_index stage (engine/stages/build_index.py) calls run.py; see docs/retrieval.md.
"""

from __future__ import annotations

from engine.retrieval.spec import RETRIEVAL, FlatIpSpec, FlatL2Spec, HnswSpec, IndexSpec, IvfPqSpec, NoRetrievalSpec

__all__ = ["RETRIEVAL", "FlatIpSpec", "FlatL2Spec", "HnswSpec", "IndexSpec", "IvfPqSpec", "NoRetrievalSpec"]
