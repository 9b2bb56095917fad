"""Continuous batching on llama.cpp: one context, a KV sequence per request, adapter sets taking turns.

Why one context with several sequences (as llama.cpp's own server does): decoding a small model
is bound by reading its weights, and one ``llama_decode`` that carries a token of each of 8
sequences reads them once for all 8. Each request is a llama.cpp *sequence* (its own
``seq_id`` in the ``llama_batch``, its own KV cells); a request that ends has its cells removed
(``llama_memory_seq_rm``) and its seq id goes back to the pool.

Why ``kv_unified=False`` with ``n_ctx = max_batch * context_length``: llama.cpp then gives every
sequence its own KV stream of ``context_length`` cells, so each request can use the whole
``serve.context_length`` whatever the others hold, and its attention runs over its own cells
laid out as when it runs alone. With one unified cache (``kv_unified=True``) 6 of 8 greedy
SmolLM2 answers changed between batched and alone (the softmax sums run over the other
sequences' masked cells too, in another order) and decoding was slower; with separate streams
8 of 8 were the same (15 of 16 over a larger set: docs/serving.md, "Batching on llama.cpp").
The price is memory: SmolLM2 at 2,048 tokens holds ~47 MB of f16 KV per sequence, ~380 MB for 8.

Why adapter sets take turns: llama.cpp applies one adapter set per context
(``llama_set_adapters_lora``). Sequences that share a set decode together in one
``llama_decode``; each other set gets its own decode in the same step, its set put on the
context first. A step with 4 sets costs 4 passes over the weights instead of one (measured in
docs/serving.md, "Batching on llama.cpp").

Why a prompt is read in chunks: a newcomer's prompt goes in ``prefill_chunk`` tokens per step,
in the same ``llama_decode`` as the others' next tokens, so a long prompt never stalls the
running streams for its whole length. Logits are asked only for a prompt's last token.

Why no prefix cache: the serial backend reused the longest cached prefix of the previous
prompt (unseeded sampling only). With one KV sequence per request there is no "previous
prompt" to reuse; every request evaluates its whole prompt, and its answer never depends on
what ran before.

Sampling is today's chain per sequence (llama.cpp samplers): temperature 0 is greedy; otherwise
top_p, then temperature, then a draw seeded with the request's seed folded to 32 bits
(0xFFFFFFFF is llama.cpp's "random"; unseeded requests get it). top_k, min_p, typical and the
repeat penalties stay off (OpenAI's semantics: temperature and top_p only).
"""

from __future__ import annotations

import codecs
import ctypes
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from engine.errors import UserError
from engine.serve.backend import AdapterScale, GenerateRequest, Piece, check_ids

AdapterSet = tuple[tuple[str, float], ...]
"""(name, scale) pairs of one request's adapters, in request order; () is the base."""


class LlamaCppBatch:
    """Up to ``size`` sequences in one llama.cpp context; the ``Batch`` of engine/serve/batch.py.

    One thread drives it (the server's scheduler, or ``engine.serve.batch.alone``). Slots are
    numbers never reused, so dropping a finished slot can never end a newer request that took
    its place; each live slot holds one of the context's ``size`` seq ids.
    """

    def __init__(
        self,
        llm,
        *,
        size: int,
        prefill_chunk: int,
        context_length: int,
        threads: int,
        adapters: Mapping[str, object],
    ):
        """
        Args:
            llm: the ``llama_cpp.Llama`` that holds the model and its vocabulary (its own
                one-sequence context is not used here).
            size: most sequences at once (``serve.max_batch``).
            prefill_chunk: prompt tokens a newcomer reads per step (``serve.prefill_chunk``).
            context_length: prompt + completion tokens per request (``serve.context_length``).
            threads: CPU threads for decoding.
            adapters: the backend's live table of loaded adapters, name -> an object whose
                ``handle`` is its ``llama_adapter_lora`` pointer; read at each ``add``, so an
                adapter loaded between steps is usable by the next request.
        """
        import llama_cpp

        self._lib = llama_cpp  # kept: at interpreter exit imports fail, and close() still runs
        self.size = size
        self.prefill_chunk = max(1, min(prefill_chunk, context_length))
        self.context_length = context_length
        self._llm = llm
        self._vocab = llm._model.vocab
        self._n_vocab = llm.n_vocab()
        self._loaded = adapters
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = size * context_length
        params.n_seq_max = size
        params.kv_unified = False  # a KV stream per sequence: the full context each (module doc)
        # One decode may carry a chunk of every sequence's prompt (all newcomers at once).
        self._capacity = size * self.prefill_chunk
        params.n_batch = self._capacity
        params.n_ubatch = min(self._capacity, 512)
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        # As ``Llama`` makes its context (the serial backend's): the same numbers, token for token.
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self._ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
        if not self._ctx:
            raise UserError(
                f"llama.cpp could not make a context for {size} sequences of {context_length} tokens "
                "(serve.max_batch x serve.context_length of KV cache); lower one of them"
            )
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self._capacity, 0, 1)
        self._seqs: dict[int, _Seq] = {}
        self._failed: dict[int, BaseException] = {}
        """Slots ended by ``fail``: reported at every step until dropped."""
        self._free_ids = list(range(size))
        self._slots = itertools.count()
        self._on_context: AdapterSet = ()
        """The adapter set now on the context (llama.cpp starts with none)."""
        self.decodes = 0
        """``llama_decode`` calls so far (tests and benchmarks read it)."""

    # --- the Batch protocol ------------------------------------------------------------

    def add(self, request: GenerateRequest) -> int:
        """Check the request, build its sampler and give it a slot; nothing is decoded yet."""
        self._live()
        prompt = [int(t) for t in request.prompt_ids]
        if not prompt:
            raise UserError("the prompt is empty; llama.cpp needs at least one token to continue from")
        check_ids(prompt, self._n_vocab)  # llama_decode would fail on them (a -1, not a message)
        room = self.context_length - len(prompt)
        if room <= 0:
            n, ctx = len(prompt), self.context_length
            raise UserError(f"the prompt has {n} tokens; the context holds {ctx} (serve.context_length)")
        wanted = adapter_set(request.adapters, self._loaded)
        if not self._free_ids:
            raise RuntimeError(f"the batch is full ({self.size} sequences); add only when a slot is free")
        handles = tuple(self._loaded[name].handle for name, _ in wanted)
        seq = _Seq(
            slot=next(self._slots),
            seq_id=self._free_ids.pop(0),
            prompt=prompt,
            budget=min(request.max_tokens, room),
            adapters=wanted,
            handles=handles,
            chain=self._sampler(request),
            text=_Text(request.stop, self._piece, self._is_eog),
        )
        self._seqs[seq.slot] = seq
        return seq.slot

    def step(self) -> dict[int, Piece | BaseException]:
        """One round: per adapter set, one ``llama_decode`` with a prompt chunk or the next token
        of each of its sequences; then each sequence that got logits samples its next token."""
        self._live()
        out: dict[int, Piece | BaseException] = dict(self._failed)
        groups: dict[AdapterSet, list[_Seq]] = {}
        for seq in self._seqs.values():
            groups.setdefault(seq.adapters, []).append(seq)
        # The set already on the context goes first: one switch fewer per step.
        for wanted in sorted(groups, key=lambda g: g != self._on_context):
            self._decode(groups[wanted], out)
        return out

    def drop(self, slot: int) -> None:
        """End a slot early (the client left); an ended or unknown slot is a no-op."""
        self._failed.pop(slot, None)
        seq = self._seqs.get(slot)
        if seq is not None and self._ctx is not None:
            self._end(seq)

    # --- beyond the protocol -----------------------------------------------------------

    def fail(self, slot: int, error: BaseException) -> None:
        """End a live slot now; every later step reports ``error`` for it until it is dropped.

        For a reader that lost its turn (an older ``generate`` still open when a newer one
        starts): it gets the error at its next step, whoever stepped the batch in between.
        """
        seq = self._seqs.get(slot)
        if seq is not None:
            self._end(seq)
            self._failed[slot] = error

    def live(self) -> list[int]:
        """The slots that hold a sequence now."""
        return list(self._seqs)

    def cached(self, slot: int) -> int:
        """Tokens of this slot in the KV cache (0 once it ended): what tests check after a drop."""
        seq = self._seqs.get(slot)
        if seq is None or self._ctx is None:
            return 0
        return self._lib.llama_memory_seq_pos_max(self._memory, seq.seq_id) + 1

    def close(self) -> None:
        """Free the samplers, the batch and the context (before the adapters and the model, which
        the backend frees next); idempotent."""
        ctx, self._ctx = getattr(self, "_ctx", None), None
        if ctx is None:
            return
        lib = self._lib
        for seq in self._seqs.values():
            lib.llama_sampler_free(seq.chain)
        self._seqs.clear()
        self._failed.clear()
        lib.llama_set_adapters_lora(ctx, None, 0, None)
        lib.llama_batch_free(self._batch)
        lib.llama_free(ctx)

    # --- one step ----------------------------------------------------------------------

    def _decode(self, seqs: list[_Seq], out: dict[int, Piece | BaseException]) -> None:
        """One ``llama_decode`` for sequences sharing an adapter set, then their samples."""
        batch, n, outputs = self._batch, 0, []
        for seq in seqs:
            if seq.pos < len(seq.prompt):  # still reading its prompt: the next chunk
                tokens = seq.prompt[seq.pos : seq.pos + self.prefill_chunk]
                ask = seq.pos + len(tokens) == len(seq.prompt)  # logits for the prompt's last token only
            else:
                tokens, ask = [seq.next_token], True
            for j, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = seq.pos + j
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq.seq_id
                batch.logits[n] = ask and j == len(tokens) - 1
                n += 1
            seq.pos += len(tokens)
            if ask:
                outputs.append((seq, n - 1))
        batch.n_tokens = n
        self.decodes += 1
        try:
            self._use(seqs[0])
            code = self._lib.llama_decode(self._ctx, batch)
            error = None if code == 0 else RuntimeError(f"llama.cpp could not decode this step (llama_decode returned {code})")
        except RuntimeError as e:  # llama.cpp refused the adapter set: these sequences end, the others go on
            error = e
        if error is not None:
            for seq in seqs:
                out[seq.slot] = error
                self._end(seq)
            return
        for seq, index in outputs:
            try:
                piece = self._next(seq, index)
            except Exception as e:  # this sequence alone: the others of the step go on
                out[seq.slot] = e
                self._end(seq)
                continue
            out[seq.slot] = piece
            if piece.finish_reason:
                self._end(seq)

    def _next(self, seq: _Seq, index: int) -> Piece:
        """Sample this sequence's next token from its logits row and turn it into a piece."""
        logits = np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self._ctx, index), shape=(self._n_vocab,))
        if not np.isfinite(logits).all():
            raise UserError(
                "the model's next-token scores are not finite (NaN or inf) with this adapter set; lower the adapter scales"
            )
        token = self._sample(seq, index)
        seq.made += 1
        seq.next_token = token
        return seq.text.add(token, last=seq.made >= seq.budget)

    def _sample(self, seq: _Seq, index: int) -> int:
        """The sequence's own sampler chain on output ``index`` of the last decode (it also
        accepts the token into the chain's state)."""
        return int(self._lib.llama_sampler_sample(seq.chain, self._ctx, index))

    def _use(self, seq: _Seq) -> None:
        """Put this sequence's adapter set on the context unless it is there already."""
        if seq.adapters == self._on_context:
            return
        lib, n = self._lib, len(seq.handles)
        handles = (lib.llama_adapter_lora_p_ctypes * n)(*seq.handles)
        scales = (ctypes.c_float * n)(*(scale for _, scale in seq.adapters))
        if lib.llama_set_adapters_lora(self._ctx, handles, n, scales) != 0:
            raise RuntimeError(f"llama.cpp refused the adapter set {seq.adapters}")
        self._on_context = seq.adapters

    def _end(self, seq: _Seq) -> None:
        """Free the sequence's KV cells, sampler and seq id."""
        del self._seqs[seq.slot]
        self._lib.llama_memory_seq_rm(self._memory, seq.seq_id, -1, -1)
        self._lib.llama_sampler_free(seq.chain)
        self._free_ids.append(seq.seq_id)

    # --- helpers -----------------------------------------------------------------------

    def _sampler(self, request: GenerateRequest):
        """The request's own llama.cpp sampler chain (module doc)."""
        lib = self._lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if request.temperature == 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return chain
        # llama.cpp's seed is 32 bits and 0xFFFFFFFF means "a random one": fold int64 seeds below it.
        seed = request.seed % 0xFFFFFFFF if request.seed is not None else lib.LLAMA_DEFAULT_SEED
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(request.top_p, 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(request.temperature))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed))
        return chain

    def _piece(self, token: int) -> bytes:
        return token_bytes(self._lib, self._vocab, token)

    def _is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token))

    def _live(self) -> None:
        if self._ctx is None:
            raise UserError("this llama.cpp backend is closed")


@dataclass(eq=False)
class _Seq:
    """One request in the batch: where its prompt reading stands, its sampler and its text."""

    slot: int
    seq_id: int
    prompt: list[int]
    budget: int
    """Most tokens to generate: max_tokens, or what is left of the context."""
    adapters: AdapterSet
    handles: tuple
    chain: object
    """Its ``llama_sampler`` chain; freed when the sequence ends."""
    text: _Text
    pos: int = 0
    """Tokens of this sequence in the KV cache (its next position)."""
    next_token: int = -1
    made: int = 0


class _Text:
    """Tokens -> text pieces, as the serial backend streamed them.

    Text is decoded from each token's bytes with an incremental UTF-8 decoder, so a character
    split over two tokens comes out whole. A tail that could still become a stop string is held
    back; text past a stop string is never emitted. Every token gives one piece (its text maybe
    empty); ``token_ids`` of all pieces together are the generated tokens (EOS excluded).
    """

    def __init__(self, stop: tuple[str, ...], piece: Callable[[int], bytes], is_eog: Callable[[int], bool]):
        self.stop, self.piece, self.is_eog = stop, piece, is_eog
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""

    def add(self, token: int, *, last: bool) -> Piece:
        """The piece for one sampled token; ``last``: the budget ends with it (``length``)."""
        if self.is_eog(token):
            return self._end([], "stop")
        self.pending += self.decoder.decode(self.piece(token))
        cut, hit = stop_cut(self.pending, 0, self.stop)
        if hit:
            return Piece(self.pending[:cut], [token], "stop")
        text, self.pending = self.pending[:cut], self.pending[cut:]
        if last:
            end = self._end([token], "length")
            return Piece(text + end.text, end.token_ids, end.finish_reason)
        return Piece(text, [token])

    def _end(self, ids: list[int], finish: str) -> Piece:
        self.pending += self.decoder.decode(b"", final=True)
        cut, hit = stop_cut(self.pending, 0, self.stop)
        return Piece(self.pending[:cut] if hit else self.pending, ids, "stop" if hit else finish)


def stop_cut(text: str, start: int, stops: tuple[str, ...]) -> tuple[int, bool]:
    """How much of ``text`` may be emitted, and whether a stop string was reached.

    ``text[:start]`` is already out. With a stop string in ``text[start:]``: (its first
    position, True). Otherwise everything but the longest tail that is a proper prefix of
    some stop string (it may complete with the next token): (that cut, False).
    """
    found = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    if found:
        return min(found), True
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text) - start), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return len(text) - hold, False


def token_bytes(llama_cpp, vocab, token: int) -> bytes:
    """The token's bytes (special tokens as nothing), growing the buffer for long pieces."""
    size = 64
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, False)
        if n >= 0:
            return buf.raw[:n]
        size = -n


def adapter_set(adapters: tuple[AdapterScale, ...], loaded: Mapping[str, object]) -> AdapterSet:
    """A request's set as (name, scale) pairs, checked; a zero scale is left out (it is the base, exactly)."""
    wanted: list[tuple[str, float]] = []
    for a in adapters:
        if a.name not in loaded:
            have = ", ".join(loaded) or "none loaded"
            raise UserError(f"adapter '{a.name}' is not loaded (loaded: {have})")
        if any(a.name == n for n, _ in wanted):
            raise UserError(f"adapter '{a.name}' is named twice in one set; give it once with the sum of its scales")
        if a.scale != 0:
            wanted.append((a.name, float(a.scale)))
    return tuple(wanted)
