"""Continuous batching on llama.cpp: a KV sequence per request, a context per adapter set.

Why a context with several sequences (as llama.cpp's own server does): one ``llama_decode``
that carries a token of each of 8 sequences costs far less than 8 decodes of one (on SmolLM2
Q4_1, 2 threads: 47 ms for 8 tokens, 13.5 ms for one). Each request is a llama.cpp *sequence* (its own
``seq_id`` in the ``llama_batch``, its own KV stream); a request that ends has its cells removed
(``llama_memory_seq_rm``) and its seq id goes back to its context.

Why a KV stream per sequence (``kv_unified=False``, ``n_ctx = sequences * context_length``):
each request can use the whole ``serve.context_length`` whatever the others hold, and its
attention runs over its own cells laid out as when it runs alone. With one unified cache
(``kv_unified=True``) 6 of 8 greedy SmolLM2 answers changed between batched and alone (the
softmax sums run over the other sequences' masked cells too, in another order) and decoding
was slower; with separate streams 8 of 8 were the same (11 to 15 of 16 over a larger set:
docs/serving.md, "Batching on llama.cpp"). The price is memory: SmolLM2 at 2,048 tokens holds
~47 MB of f16 KV per sequence, ~380 MB for 8.

Why a context per adapter set: llama.cpp applies one adapter set per context
(``llama_set_adapters_lora``), and a context whose set changes re-plans its whole compute
graph at its next decode (``sched_reserve``: new scheduler, worst-case graphs, buffers) and
loses the graph it could have reused. Sequences sharing a set decode together in one
``llama_decode``; when sets took turns on one context, 8 sequences on 4 adapters ran at 0.75x
the serial server. So the *home* context (room for ``size`` sequences: the memory of one
context, as before) takes the first set, and each other set present gets a *side* context of
its own whose set is put on once: no switch, the graph reused from step to step. Sides hold at
most ``size`` sequences in all (KV at most twice the home's), are sized for their set's
newcomers (a power of two, at least 2: a set that grows by one stays in one context), are reused by the next
set when they empty, and are freed once nothing runs. When the sides' seats are taken, a
newcomer joins the home context and sets take turns there with a switch, as before. A step
still costs one ``llama_decode`` per set present; with 2 threads, even halves of the busy
contexts decode side by side on one thread each (``_halves``). Measured: 8 requests on 4
adapters went from 0.87x to ~1.5x the tokens of one request at a time (docs/serving.md,
"Batching on llama.cpp").

Why seq ids in order: llama.cpp puts a run of consecutive seq ids in one ubatch and splits a
decode at any other; seq ids handed out first-in-first-out and a batch filled in arrival order
made one decode several (a set on seq ids 0 and 4: two graph computations). Each context hands
out its lowest free id and each decode lists its sequences by seq id (``_groups``).

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
import concurrent.futures
import ctypes
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from engine.errors import UserError
from engine.serve.backend import AdapterScale, GenerateRequest, Piece, check_ids
from engine.serve.backends.llamacpp_context import AdapterSet, Context

_DECODE_COST = 1.8
"""What one ``llama_decode`` costs on its own, in tokens' worth (SmolLM2 Q4_1, 2 threads: ~9.5 ms, and ~5.3 ms a token)."""
_HALF_THREADS_SLOWER = 1.7
"""A small decode on 1 thread takes ~1.7x its time on 2 (measured on 2 cores): the halves go side
by side only when the heavier one, that much slower, still ends before both one after another."""


class LlamaCppBatch:
    """Up to ``size`` sequences over llama.cpp contexts; the ``Batch`` of engine/serve/batch.py.

    One thread drives it (the server's scheduler, or ``engine.serve.batch.alone``). Slots are
    numbers never reused, so dropping a finished slot can never end a newer request that took
    its place. A new slot gets its KV sequence (a context and a seq id in it) at the next step,
    when every request admitted with it is known (``_place``).
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
        self._threads = threads
        self._llm = llm
        self._vocab = llm._model.vocab
        self._n_vocab = llm.n_vocab()
        self._loaded = adapters
        self._home: Context | None = self._context(size)
        if self._home is None:
            raise UserError(
                f"llama.cpp could not make a context for {size} sequences of {context_length} tokens "
                "(serve.max_batch x serve.context_length of KV cache); lower one of them"
            )
        self._sides: list[Context] = []
        """Contexts of one adapter set each, beside the home context (module doc); at most ``size`` seats in all."""
        self._seqs: dict[int, _Seq] = {}
        self._failed: dict[int, BaseException] = {}
        """Slots ended by ``fail``: reported at every step until dropped."""
        self._slots = itertools.count()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        """Two threads for decoding contexts side by side (``_halves``); made on first use."""
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
        if len(self._seqs) >= self.size:
            raise RuntimeError(f"the batch is full ({self.size} sequences); add only when a slot is free")
        seq = _Seq(
            slot=next(self._slots),
            prompt=prompt,
            budget=min(request.max_tokens, room),
            adapters=wanted,
            handles=tuple(self._loaded[name].handle for name, _ in wanted),
            chain=self._sampler(request),
            text=_Text(request.stop, self._piece, self._is_eog),
        )
        self._seqs[seq.slot] = seq
        return seq.slot

    def step(self) -> dict[int, Piece | BaseException]:
        """One round: newcomers get their KV sequence; then per context and adapter set, one
        ``llama_decode`` with a prompt chunk or the next token of each of its sequences; then each
        sequence that got logits samples its next token."""
        self._live()
        self._place()
        out: dict[int, Piece | BaseException] = dict(self._failed)
        work = [(context, self._groups(context)) for context in self._contexts() if context.seqs]
        self.decodes += sum(len(groups) for _, groups in work)
        halves = self._halves(work)
        if halves is None:
            out.update(self._run(work, self._threads))
        else:
            out.update(self._side_by_side(halves))
        self._tidy()
        return out

    def drop(self, slot: int) -> None:
        """End a slot early (the client left); an ended or unknown slot is a no-op."""
        self._failed.pop(slot, None)
        seq = self._seqs.get(slot)
        if seq is not None and self._home is not None:
            self._end(seq)
            self._tidy()

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
            self._tidy()

    def live(self) -> list[int]:
        """The slots that hold a sequence now."""
        return list(self._seqs)

    def cached(self, slot: int) -> int:
        """Tokens of this slot in the KV cache (0 once it ended): what tests check after a drop."""
        seq = self._seqs.get(slot)
        if seq is None or seq.context is None or self._home is None:
            return 0
        return self._lib.llama_memory_seq_pos_max(seq.context.memory, seq.seq_id) + 1

    def contexts(self) -> list[tuple[AdapterSet, int, int]]:
        """(adapter set on it, sequences it holds, sequences it has room for) per context, home
        first: what tests and benchmarks read."""
        return [(c.on, len(c.seqs), c.room) for c in self._contexts()]

    def held(self) -> int:
        """KV cells in use over all contexts (0 once every sequence ended)."""
        lib = self._lib
        return sum(lib.llama_memory_seq_pos_max(c.memory, seq_id) + 1 for c in self._contexts() for seq_id in range(c.room))

    def close(self) -> None:
        """Free the samplers, then every context (before the adapters and the model, which the
        backend frees next); idempotent."""
        home, self._home = getattr(self, "_home", None), None
        if home is None:
            return
        if self._pool is not None:
            self._pool.shutdown()
        for seq in self._seqs.values():
            self._lib.llama_sampler_free(seq.chain)
        self._seqs.clear()
        self._failed.clear()
        for context in [home, *self._sides]:
            context.close()
        self._sides.clear()

    # --- where a sequence lives ----------------------------------------------------------

    def _contexts(self) -> list[Context]:
        return [self._home, *self._sides] if self._home is not None else []

    def _place(self) -> None:
        """Give each newcomer a seq id in a context for its set: the sets with most newcomers first
        (on a tie, the set already on the home context: it may stay there with no switch)."""
        waiting: dict[AdapterSet, list[_Seq]] = {}
        for seq in self._seqs.values():
            if seq.context is None:
                waiting.setdefault(seq.adapters, []).append(seq)
        for wanted, seqs in sorted(waiting.items(), key=lambda item: (-len(item[1]), item[0] != self._home.on)):
            for n, seq in enumerate(seqs):
                self._where(wanted, len(seqs) - n).take(seq)

    def _where(self, wanted: AdapterSet, need: int) -> Context:
        """The context for one newcomer on ``wanted`` (``need``: its set's newcomers still unplaced).

        In order: a context that holds only this set and has room (the largest); an idle
        context, the home one first (its set is switched once); a new side context with room
        for the set's newcomers (a power of two, at least 2: a set that grows by one stays in
        one context) within the sides' ``size`` seats; else the home context, where sets take
        turns with a switch before each decode (it always has room: at most ``size``
        sequences live). A side llama.cpp cannot allocate is no error: the home takes the
        sequence.
        """
        own = [c for c in self._contexts() if c.free and c.holds_only(wanted)]
        if own:
            return max(own, key=lambda c: (c.room, len(c.free)))
        idle = [c for c in self._contexts() if not c.seqs]
        if idle:
            return idle[0]
        seats = self.size - sum(c.room for c in self._sides)
        side = self._context(min(seats, 1 << max(1, need - 1).bit_length())) if seats > 0 else None
        if side is None:
            return self._home
        self._sides.append(side)
        return side

    def _context(self, room: int) -> Context | None:
        return Context.make(
            self._lib,
            self._llm._model.model,
            room=room,
            context_length=self.context_length,
            prefill_chunk=self.prefill_chunk,
            threads=self._threads,
        )

    def _tidy(self) -> None:
        """Once nothing runs, free the side contexts: at rest the batch holds what one context holds."""
        if not self._seqs and self._sides:
            for side in self._sides:
                side.close()
            self._sides.clear()

    # --- one step ----------------------------------------------------------------------

    @staticmethod
    def _groups(context: Context) -> list[list[_Seq]]:
        """The context's sequences by adapter set, the set already on it first (one switch fewer),
        each in seq id order: llama.cpp puts a run of consecutive seq ids in one ubatch and splits
        a decode at any other (``split_equal``), computing the graph once per piece."""
        groups: dict[AdapterSet, list[_Seq]] = {}
        for seq in sorted(context.seqs.values(), key=lambda seq: seq.seq_id):
            groups.setdefault(seq.adapters, []).append(seq)
        return [groups[wanted] for wanted in sorted(groups, key=lambda g: g != context.on)]

    def _halves(self, work: list[tuple[Context, list[list[_Seq]]]]) -> tuple[list, list] | None:
        """The busy contexts in two halves to decode side by side on half the threads each, or None.

        Why: on 2 cores a small decode gains little from a second thread (a 2-token decode took
        20 ms on 2 threads, 34 ms on 1), so 4 adapter sets of 2 sequences decoded as two halves
        of 2 sets, one thread each, took 66 ms a step against 83 ms one after another (SmolLM2
        Q4_1). Only when the halves are even: 6 sequences beside 2 took 69 ms against 61.
        Threads do not change llama.cpp's numbers (bit for bit), so the answers stay the same.
        """
        if self._threads < 2 or len(work) < 2:
            return None
        halves: tuple[list, list] = ([], [])
        loads = [0.0, 0.0]
        for item in sorted(work, key=self._cost, reverse=True):
            lighter = loads.index(min(loads))
            halves[lighter].append(item)
            loads[lighter] += self._cost(item)
        return halves if max(loads) * _HALF_THREADS_SLOWER < sum(loads) else None

    def _cost(self, item: tuple[Context, list[list[_Seq]]]) -> float:
        """A context's decodes this step, in tokens' worth (each decode costs a few on its own)."""
        return sum(_DECODE_COST + sum(seq.step_tokens(self.prefill_chunk) for seq in group) for group in item[1])

    def _side_by_side(self, halves: tuple[list, list]) -> dict[int, Piece | BaseException]:
        """Each half in its own thread (llama_decode lets go of the GIL), each context of a half
        on half the threads; every half is waited for before an error is raised."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="llamacpp-decode")
        futures = [self._pool.submit(self._run, half, max(1, self._threads // 2)) for half in halves]
        concurrent.futures.wait(futures)
        out: dict[int, Piece | BaseException] = {}
        for future in futures:
            out.update(future.result())
        return out

    def _run(self, work: list[tuple[Context, list[list[_Seq]]]], threads: int) -> dict[int, Piece | BaseException]:
        """The decodes of these contexts one after another, on ``threads`` threads each."""
        out: dict[int, Piece | BaseException] = {}
        for context, groups in work:
            context.threads(threads)
            for seqs in groups:
                self._decode(context, seqs, out)
        return out

    def _decode(self, context: Context, seqs: list[_Seq], out: dict[int, Piece | BaseException]) -> None:
        """One ``llama_decode`` for sequences of one context sharing an adapter set, then their samples."""
        batch, n, outputs = context.batch, 0, []
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
        try:
            context.use(seqs[0].adapters, seqs[0].handles)
            code = self._lib.llama_decode(context.ctx, batch)
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
        ctx = seq.context.ctx
        logits = np.ctypeslib.as_array(self._lib.llama_get_logits_ith(ctx, index), shape=(self._n_vocab,))
        if not np.isfinite(logits).all():
            raise UserError(
                "the model's next-token scores are not finite (NaN or inf) with this adapter set; lower the adapter scales"
            )
        token = self._sample(seq, index)
        seq.made += 1
        seq.next_token = token
        return seq.text.add(token, last=seq.made >= seq.budget)

    def _sample(self, seq: _Seq, index: int) -> int:
        """The sequence's own sampler chain on output ``index`` of its context's last decode (it
        also accepts the token into the chain's state)."""
        return int(self._lib.llama_sampler_sample(seq.chain, seq.context.ctx, index))

    def _end(self, seq: _Seq) -> None:
        """Free the sequence's KV cells, seq id and sampler."""
        del self._seqs[seq.slot]
        if seq.context is not None:
            seq.context.release(seq)
        self._lib.llama_sampler_free(seq.chain)

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
        if self._home is None:
            raise UserError("this llama.cpp backend is closed")


@dataclass(eq=False)
class _Seq:
    """One request in the batch: where its prompt reading stands, its sampler and its text."""

    slot: int
    prompt: list[int]
    budget: int
    """Most tokens to generate: max_tokens, or what is left of the context."""
    adapters: AdapterSet
    handles: tuple
    chain: object
    """Its ``llama_sampler`` chain; freed when the sequence ends."""
    text: _Text
    context: Context | None = None
    """Where its KV lives; None until the step after it was added (``_place``)."""
    seq_id: int = -1
    pos: int = 0
    """Tokens of this sequence in the KV cache (its next position)."""
    next_token: int = -1
    made: int = 0

    def step_tokens(self, chunk: int) -> int:
        """Tokens it feeds the next decode: a prompt chunk while reading its prompt, else one."""
        return min(chunk, len(self.prompt) - self.pos) if self.pos < len(self.prompt) else 1


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
