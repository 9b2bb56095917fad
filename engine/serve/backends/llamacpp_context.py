"""One llama.cpp context of the batch (engine/serve/backends/llamacpp_batch.py): KV streams, seq ids, an adapter set.

The batch owns a *home* context and a *side* context per other adapter set (that module's doc
says why); this is what each of them is: its parameters, its free seq ids, the sequences whose
KV lives in it and the adapter set on it.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.serve.backends.llamacpp_batch import _Seq as Seq

AdapterSet = tuple[tuple[str, float], ...]
"""(name, scale) pairs of one request's adapters, in request order; () is the base."""


class Context:
    """One llama.cpp context: a KV stream for each of ``room`` sequences and one adapter set on it.

    Why a stream per sequence (``kv_unified=False``, ``n_ctx = room * context_length``): each
    request can use the whole ``serve.context_length`` whatever the others hold, and its
    attention runs over its own cells laid out as when it runs alone (llamacpp_batch.py's module doc).
    """

    def __init__(self, lib, ctx, *, room: int, tokens: int, threads: int):
        self._lib = lib
        self.ctx = ctx
        self.room = room
        self.memory = lib.llama_get_memory(ctx)
        self.batch = lib.llama_batch_init(tokens, 0, 1)
        self.free = list(range(room))
        """Seq ids not in use, lowest first."""
        self.seqs: dict[int, Seq] = {}
        """slot -> the sequences whose KV lives here."""
        self.on: AdapterSet = ()
        """The adapter set now on the context (llama.cpp starts with none)."""
        self._threads = threads

    @classmethod
    def make(cls, lib, model, *, room: int, context_length: int, prefill_chunk: int, threads: int) -> Context | None:
        """A context for ``room`` sequences; None when llama.cpp cannot allocate it."""
        params = lib.llama_context_default_params()
        params.n_ctx = room * context_length
        params.n_seq_max = room
        params.kv_unified = False  # a KV stream per sequence (class doc)
        # One decode may carry a chunk of every sequence's prompt (all newcomers at once). Sizing
        # the compute buffer for one output per sequence (n_outputs_max) would halve it (99 -> 46
        # MB) but made a step of 8 sequences on an adapter ~4% slower: llama.cpp's default stays.
        tokens = room * prefill_chunk
        params.n_batch = tokens
        params.n_ubatch = min(tokens, 512)
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        # As ``Llama`` makes its context (the serial backend's): the same numbers, token for token.
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = lib.llama_init_from_model(model, params)
        return cls(lib, ctx, room=room, tokens=tokens, threads=threads) if ctx else None

    def holds_only(self, wanted: AdapterSet) -> bool:
        """Every sequence here is on ``wanted`` (and so is the context, when it holds none)."""
        if not self.seqs:
            return self.on == wanted
        return all(seq.adapters == wanted for seq in self.seqs.values())

    def take(self, seq: Seq) -> None:
        seq.context, seq.seq_id = self, self.free.pop(0)
        self.seqs[seq.slot] = seq

    def release(self, seq: Seq) -> None:
        """Free the sequence's KV cells and its seq id (lowest ids first: the same streams alone)."""
        del self.seqs[seq.slot]
        self._lib.llama_memory_seq_rm(self.memory, seq.seq_id, -1, -1)
        self.free.append(seq.seq_id)
        self.free.sort()

    def threads(self, n: int) -> None:
        """Decode on ``n`` threads from now on (a field of the context: nothing is re-planned)."""
        if n != self._threads:
            self._lib.llama_set_n_threads(self.ctx, n, n)
            self._threads = n

    def use(self, adapters: AdapterSet, handles: tuple) -> None:
        """Put this adapter set on the context unless it is there already."""
        if adapters == self.on:
            return
        lib, n = self._lib, len(handles)
        pointers = (lib.llama_adapter_lora_p_ctypes * n)(*handles)
        scales = (ctypes.c_float * n)(*(scale for _, scale in adapters))
        if lib.llama_set_adapters_lora(self.ctx, pointers, n, scales) != 0:
            raise RuntimeError(f"llama.cpp refused the adapter set {adapters}")
        self.on = adapters

    def close(self) -> None:
        """Take the adapter set off, then free the batch and the context."""
        lib = self._lib
        lib.llama_set_adapters_lora(self.ctx, None, 0, None)
        lib.llama_batch_free(self.batch)
        lib.llama_free(self.ctx)
