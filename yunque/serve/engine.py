"""Continuous batching over one static KV pool.

The pool is (max_batch, K, max_len, hd) per layer. Each running sequence owns one row and
writes its keys/values at slots 0..len-1 of that row, so RoPE position == cache slot and no
padding is ever attended. Running sequences always occupy rows 0..n-1: a decode step is one
forward over `pool[:n]` (a view, no copy), new sequences are prefilled into rows n..n+m-1
between decode steps, and a finished sequence's row is refilled by moving the last row into
it. The model is untouched: the engine installs its own cache objects, which keep the
`KVCache.update(slots, k, v) -> (k, v)` contract but take per-row slots (B, T).

One engine thread runs the loop; HTTP handlers talk to it only through `submit` (thread-safe,
raises `Overloaded` when the waiting queue is full), `cancel`, and an event callback the
engine calls with ("delta", text) and finally ("done", finish_reason, prompt_tokens, completion_tokens)
or ("error", message). A sequence that asked for logprobs also gets ("logprobs", token_id, logprob,
[(id, logprob), ...]) before the text of each sampled token (not for the stop token): the log-softmax
of the model's own logits, before penalties, temperature and top-p.

Embeddings (`embed`) share the thread: between decode steps, waiting inputs up to the prefill
token budget are packed into one row (each input its own causal segment, with the caches set
aside) and pooled; the caller's callback gets ("embeddings", [vector, ...]) or ("error", message).

Failures stay with the requests that hit them: a row whose logits are not finite (NaN/Inf
weights or activations) or whose text cannot be decoded ends with an error and the others go
on; a step that raises fails the sequences of that step only. Anything else that escapes the
loop ends the thread: every open sequence gets an error, `error` says why, `on_death` is
called (the server restarts the engine or exits) and `submit` raises `EngineDown` meanwhile.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn

from yunque.generate import TextDecoder
from yunque.model import Transformer
from yunque.ops.attention import Segments
from yunque.sampling import penalize_counts, sample
from yunque.serve.embeddings import pool
from yunque.serve.grammar import Constraint, Grammar, mask_disallowed

Event = tuple
OnEvent = Callable[[Event], None]
log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The waiting queue is full: the caller should answer 429 rather than queue without bound."""


class EngineDown(Exception):
    """The engine thread has died and is not running again (yet): the caller should answer 503."""


class _PoolCache(torch.nn.Module):
    """One layer's slice of the pool, duck-typed as `yunque.model.KVCache` for rows [lo, hi)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        super().__init__()
        self.k, self.v = k, v
        self.lo, self.hi, self.span = 0, 0, k.shape[2]

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Views into the pool, cut to the longest row in the batch: attention (and GQA's head
        # repeat) then costs what the batch holds, not what the pool could hold.
        kc, vc = self.k[self.lo : self.hi, :, : self.span], self.v[self.lo : self.hi, :, : self.span]
        rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1)
        kc[rows, :, slots] = k.transpose(1, 2)  # slots (B, T): row b writes its T tokens at its own slots
        vc[rows, :, slots] = v.transpose(1, 2)
        return kc, vc


@dataclass
class SeqParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: int | None = None  # None: none; k: the sampled token's logprob and the k most likely
    grammar: Grammar | None = None  # constrained decoding (response_format, forced tool calls)


@dataclass(eq=False)
class Seq:
    prompt: list[int]
    params: SeqParams
    on_event: OnEvent
    id: int = 0
    cancelled: bool = False
    generated: int = 0
    length: int = 0  # tokens in the cache
    last: int = 0  # last sampled token, fed at the next decode step
    decoder: TextDecoder | None = None
    gen: torch.Generator | None = None
    counts: torch.Tensor | None = None  # (V,) times each token was sampled, when penalties are on
    constraint: Constraint | None = None  # this sequence's own grammar state
    submitted: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class EmbedJob:
    """One embedding request: its inputs as token ids, pooled vectors as they are computed."""

    inputs: list[list[int]]
    pooling: str
    normalize: bool
    on_event: OnEvent
    vectors: list = field(default_factory=list)
    left: int = 0
    cancelled: bool = False

    def __post_init__(self) -> None:
        self.vectors, self.left = [None] * len(self.inputs), len(self.inputs)


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer,
        max_batch: int,
        max_len: int,
        max_queue: int,
        max_prefill_tokens: int = 2048,
        on_step: Callable[[Engine], None] | None = None,
        on_death: Callable[[BaseException], None] | None = None,
    ):
        self.model, self.tok = model.eval(), tokenizer
        self.max_batch, self.max_len, self.max_queue = max_batch, max_len, max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.on_step = on_step  # metrics hook (queue depth, running), called from the engine thread
        self.on_death = on_death  # called from the dying engine thread, after every open sequence has its error
        cfg = model.config
        p = model.model.embed_tokens.weight
        self.device = p.device
        shape = (max_batch, cfg.num_key_value_heads, max_len, cfg.head_size)
        self.caches = [
            _PoolCache(
                torch.zeros(shape, dtype=p.dtype, device=p.device), torch.zeros(shape, dtype=p.dtype, device=p.device)
            )
            for _ in model.model.layers
        ]
        for layer, c in zip(model.model.layers, self.caches):
            layer.self_attn.cache = c
        self.window = cfg.sliding_window
        self.stop_ids = set(tokenizer.stop_ids)
        self.running: list[Seq] = []  # row i holds running[i]
        self.waiting: deque[Seq] = deque()
        self.embeds: deque[tuple[EmbedJob, int]] = deque()  # (job, input index) not embedded yet
        self.vocab_size = cfg.vocab_size
        self._cv = threading.Condition()
        self._ids = itertools.count(1)
        self._stopping = False
        self._rng = torch.Generator(device=self.device).manual_seed(int(time.time_ns() % 2**63))
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # why the engine thread died (None: running)
        self.restarts = 0

    # -- API for the server (any thread) ---------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; after it died (every sequence it held has been failed),
        start a fresh one."""
        with self._cv:
            if self._thread is not None and self._thread.is_alive() and self.error is None:
                return
            if self._thread is not None:
                self.restarts += 1
            self.error = None
            self._thread = threading.Thread(target=self._loop, name="yunque-engine", daemon=True)
        self._thread.start()

    def submit(
        self, prompts: Sequence[list[int]], params: Sequence[SeqParams], on_event: Sequence[OnEvent]
    ) -> list[Seq]:
        """Queue several sequences atomically (all choices of one request, or none)."""
        seqs = [Seq(list(p), sp, cb) for p, sp, cb in zip(prompts, params, on_event)]
        for s in seqs:  # the server validates first; this guards the pool against a caller's bug
            if not s.prompt or len(s.prompt) + s.params.max_tokens > self.max_len:
                raise ValueError(
                    f"prompt of {len(s.prompt)} tokens + max_tokens {s.params.max_tokens} does not fit a cache row of {self.max_len}"  # noqa: E501
                )
        with self._cv:
            if self.error is not None:
                raise EngineDown(f"the engine failed ({type(self.error).__name__}: {self.error})")
            if self._stopping:
                raise Overloaded("the server is shutting down")
            free = self.max_batch - len(self.running)
            if len(self.waiting) + len(seqs) > self.max_queue + max(0, free):
                raise Overloaded(f"{len(self.waiting)} sequences already waiting")
            for s in seqs:
                s.id = next(self._ids)
                s.decoder = TextDecoder(self.tok, s.params.stop)
                if s.params.seed is not None:
                    s.gen = torch.Generator(device=self.device).manual_seed(s.params.seed)
                if s.params.frequency_penalty or s.params.presence_penalty:
                    s.counts = torch.zeros(self.vocab_size, device=self.device)
                if s.params.grammar is not None:
                    s.constraint = s.params.grammar.start()
                self.waiting.append(s)
            self._cv.notify()
        return seqs

    def embed(self, inputs: Sequence[list[int]], pooling: str, normalize: bool, on_event: OnEvent) -> EmbedJob:
        """Queue one embedding request (all its inputs); `on_event` gets its vectors in input order."""
        job = EmbedJob([list(x) for x in inputs], pooling, normalize, on_event)
        with self._cv:
            if self.error is not None:
                raise EngineDown(f"the engine failed ({type(self.error).__name__}: {self.error})")
            if self._stopping:
                raise Overloaded("the server is shutting down")
            if len({id(j) for j, _ in self.embeds}) >= max(1, self.max_queue):
                raise Overloaded(f"{self.max_queue} embedding requests already waiting")
            self.embeds.extend((job, i) for i in range(len(job.inputs)))
            self._cv.notify()
        return job

    def cancel(self, seqs: Sequence[Seq]) -> None:
        """Stop generating for `seqs`; they leave the batch at the next step (milliseconds)."""
        for s in seqs:
            s.cancelled = True
        with self._cv:
            self._cv.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Finish everything queued and running, then end the engine thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """The engine thread is running (started, not stopped, not dead)."""
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def n_running(self) -> int:
        return len(self.running)

    # -- engine thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._cv:
                        while not (self.waiting or self.running or self.embeds or self._stopping):
                            self._cv.wait()
                        if self._stopping and not self.waiting and not self.running and not self.embeds:
                            return
                        new = self._admit()
                        embeds = self._take_embeds()
                    if embeds:
                        self._embed(embeds)
                    self._step(new)
        except BaseException as e:  # a bug outside any one step: fail every open request instead of hanging it
            log.error("serving engine died", exc_info=e)
            with self._cv:
                self.error = e
                for s in list(self.waiting) + self.running:
                    s.on_event(("error", f"engine failure: {type(e).__name__}"))
                for job in {id(j): j for j, _ in self.embeds}.values():
                    job.on_event(("error", f"engine failure: {type(e).__name__}"))
                self.waiting.clear()
                self.running.clear()
                self.embeds.clear()
            if self.on_death is not None:
                self.on_death(e)

    def _step(self, new: list[Seq]) -> None:
        """One prefill (of `new`) and one decode step. What raises fails the sequences it was
        working on, and only those: the loop goes on for everyone else."""
        self._drop_cancelled()
        if new:
            try:
                self._prefill(new)
            except Exception as e:
                self._fail(new, e)
        if self.running:
            try:
                self._decode()
            except Exception as e:
                self._fail(list(self.running), e)
        if self.on_step is not None:
            self.on_step(self)

    def _fail(self, seqs: Sequence[Seq], e: Exception | str) -> None:
        if isinstance(e, Exception):
            log.error("serving engine: a step failed for %d sequence(s)", len(seqs), exc_info=e)
            e = f"engine failure: {type(e).__name__}"
        for s in seqs:
            if s in self.running:
                # Clear the row: its next owner attends (with weight 0) to slots past its own length
                # while a longer row shares the batch, and 0 x NaN is NaN. The last row moves into it,
                # and the row it leaves is cleared too: it may be a copy of another row failing now.
                r = self.running.index(s)
                self._clear_row(r)
                self._remove(s)
                self._clear_row(len(self.running))
            s.on_event(("error", e))

    def _clear_row(self, r: int) -> None:
        for c in self.caches:
            c.k[r].zero_()
            c.v[r].zero_()

    def _admit(self) -> list[Seq]:
        new: list[Seq] = []
        budget = self.max_prefill_tokens
        while self.waiting and len(self.running) + len(new) < self.max_batch:
            s = self.waiting[0]
            if s.cancelled:
                self.waiting.popleft()
                s.on_event(("done", "cancelled", len(s.prompt), 0))
                continue
            longest = max([len(s.prompt)] + [len(x.prompt) for x in new])
            if new and longest * (len(new) + 1) > budget:  # padded prefill cost; always admit one
                break
            new.append(self.waiting.popleft())
        return new

    def _take_embeds(self) -> list[tuple[EmbedJob, int]]:
        """Waiting embedding inputs for one packed forward: up to the prefill budget (always one)."""
        out: list[tuple[EmbedJob, int]] = []
        total = 0
        while self.embeds:
            job, i = self.embeds[0]
            if job.cancelled:
                self.embeds.popleft()
                continue
            n = len(job.inputs[i])
            if out and total + n > self.max_prefill_tokens:
                break
            out.append(self.embeds.popleft())
            total += n
        return out

    def _embed(self, items: list[tuple[EmbedJob, int]]) -> None:
        """One forward over `items` packed in a row of causal segments, with the KV pool set
        aside (nothing is cached); a failure fails these requests only."""
        jobs = {id(j): j for j, _ in items}
        try:
            ids = [t for j, i in items for t in j.inputs[i]]
            lengths = [len(j.inputs[i]) for j, i in items]
            pos = torch.cat([torch.arange(n) for n in lengths])[None].to(self.device)
            layers = self.model.model.layers
            for layer in layers:
                layer.self_attn.cache = None
            try:
                h = self.model.hidden(torch.tensor([ids], device=self.device), pos, Segments(tuple(lengths)))[0]
            finally:
                for layer, c in zip(layers, self.caches):
                    layer.self_attn.cache = c
            for (j, i), hs in zip(items, h.split(lengths)):
                j.vectors[i] = pool(hs, j.pooling, j.normalize).cpu()
                j.left -= 1
                if j.left == 0:
                    j.on_event(("embeddings", j.vectors))
        except Exception as e:
            log.error("serving engine: an embedding batch failed", exc_info=e)
            for j in jobs.values():
                j.cancelled = True  # its inputs still waiting are dropped
                j.on_event(("error", f"engine failure: {type(e).__name__}"))

    def _set_rows(self, lo: int, hi: int, span: int) -> None:
        for c in self.caches:
            c.lo, c.hi, c.span = lo, hi, span

    def _mask(self, q_pos: torch.Tensor, span: int) -> torch.Tensor:
        """(B, T) query slots -> (B, 1, T, span) bool: causal within each row (+ sliding window)."""
        k = torch.arange(span, device=self.device)
        m = k[None, None, :] <= q_pos[:, :, None]
        if self.window is not None:
            m &= k[None, None, :] > q_pos[:, :, None] - self.window
        return m[:, None]

    def _prefill(self, new: list[Seq]) -> None:
        n, m = len(self.running), len(new)
        T = max(len(s.prompt) for s in new)
        ids = torch.zeros(m, T, dtype=torch.long)
        for i, s in enumerate(new):
            ids[i, : len(s.prompt)] = torch.tensor(s.prompt)  # right padding: slots past a prompt get
            # junk that the row's own later tokens overwrite before anyone attends to them
        ids = ids.to(self.device)
        pos = torch.arange(T, device=self.device).expand(m, T)
        self._set_rows(n, n + m, T)
        h = self.model.hidden(ids, pos, self._mask(pos, T), pos)  # (m, T, D)
        last = torch.tensor([len(s.prompt) - 1 for s in new], device=self.device)
        # The head on each prompt's last position only: over all T it would cost m x T x V.
        logits = self.model.lm_head(h[torch.arange(m, device=self.device), last])  # (m, V)
        for s in new:
            s.length = len(s.prompt)
        self.running.extend(new)
        self._sample_and_emit(logits, new, first_row=n)

    def _decode(self) -> None:
        n = len(self.running)
        tok = torch.tensor([[s.last] for s in self.running], device=self.device)
        pos = torch.tensor([[s.length] for s in self.running], device=self.device)
        span = max(s.length for s in self.running) + 1
        self._set_rows(0, n, span)
        logits = self.model(tok, pos, self._mask(pos, span), pos)[:, -1]
        for s in self.running:
            s.length += 1
        self._sample_and_emit(logits, list(self.running), first_row=0)

    def _sample_and_emit(self, logits: torch.Tensor, seqs: list[Seq], first_row: int) -> None:
        # A row that is not finite cannot be sampled (multinomial raises; argmax returns junk):
        # it ends that sequence alone. Rows are independent, so the others are still good.
        finite = torch.isfinite(logits).all(-1).tolist()
        if not all(finite):
            bad = [s for s, ok in zip(seqs, finite, strict=True) if not ok]
            self._fail(bad, "the model produced non-finite logits (NaN or Inf) for this request")
            keep = [i for i, ok in enumerate(finite) if ok]
            logits, seqs = logits[keep], [seqs[i] for i in keep]
            if not seqs:
                return
        want = [k for k, s in enumerate(seqs) if s.params.logprobs is not None]
        lsm = logits[want].float().log_softmax(-1) if want else None  # the model's own, before any change below
        nxt = sample_rows(self._adjust(logits, seqs), [s.params for s in seqs], [s.gen for s in seqs], self._rng)
        nxt = nxt.tolist()
        if want:
            self._emit_logprobs([seqs[k] for k in want], lsm, [nxt[k] for k in want])
        refused = []
        for s, t in zip(seqs, nxt, strict=True):
            if s.counts is not None:
                s.counts[t] += 1
            if s.constraint is not None and not s.constraint.accept(t):
                refused.append(s)  # the mask allowed it, so the grammar engine disagrees with itself
        if refused:
            self._fail(refused, "the grammar refused the sampled token")
            keep = [k for k, s in enumerate(seqs) if s not in refused]
            seqs, nxt = [seqs[k] for k in keep], [nxt[k] for k in keep]
        finished: list[tuple[Seq, str]] = []
        failed: list[tuple[Seq, Exception]] = []
        for s, t in zip(seqs, nxt, strict=True):
            s.last, s.generated = t, s.generated + 1
            try:
                reason = self._emit(s, t)
            except Exception as e:  # e.g. a decoder error on this sequence's text
                failed.append((s, e))
                continue
            if reason is not None:
                finished.append((s, reason))
        # "done" answers the caller: the row is freed first, so whoever reads the engine's state
        # after their answer (the status page, the next request) no longer counts it as running.
        for s, reason in finished:
            self._remove(s)
            s.on_event(("done", reason, len(s.prompt), s.generated))
        for s, e in failed:
            self._fail([s], e)

    def _adjust(self, logits: torch.Tensor, seqs: list[Seq]) -> torch.Tensor:
        """OpenAI's penalties, then each grammar's mask, on the rows that have them."""
        pen = [k for k, s in enumerate(seqs) if s.counts is not None]
        if pen:
            rows = torch.tensor(pen, device=logits.device)
            freq = torch.tensor([seqs[k].params.frequency_penalty for k in pen], device=logits.device)
            pres = torch.tensor([seqs[k].params.presence_penalty for k in pen], device=logits.device)
            counts = torch.stack([seqs[k].counts for k in pen])
            logits = logits.float().index_copy(0, rows, penalize_counts(logits[rows].float(), counts, freq, pres))
        constrained = [(k, s.constraint) for k, s in enumerate(seqs) if s.constraint is not None]
        return mask_disallowed(logits, constrained) if constrained else logits

    def _emit_logprobs(self, seqs: list[Seq], lsm: torch.Tensor, picked: list[int]) -> None:
        """("logprobs", id, logprob, top) for each sampled token but a stop token (which has no text)."""
        k_top = max(s.params.logprobs for s in seqs)
        top = [([], [])] * len(seqs)
        if k_top > 0:
            values, ids = lsm.topk(k_top)
            top = list(zip(values.tolist(), ids.tolist()))
        rows = torch.arange(len(seqs), device=lsm.device)
        chosen = lsm[rows, torch.tensor(picked, device=lsm.device)].tolist()
        for j, (s, t) in enumerate(zip(seqs, picked, strict=True)):
            if t not in self.stop_ids:
                n = s.params.logprobs
                s.on_event(("logprobs", t, chosen[j], list(zip(top[j][1][:n], top[j][0][:n]))))

    def _emit(self, s: Seq, t: int) -> str | None:
        """Send sequence `s`'s text for its new token `t`; its finish reason if it is done (the
        caller sends "done" once the row is freed)."""
        reason = None
        if t in self.stop_ids:
            reason = "stop"
        else:
            delta = s.decoder.add(t)
            if delta:
                s.on_event(("delta", delta))
            if s.decoder.stopped:
                reason = "stop"
            elif s.generated >= s.params.max_tokens or s.length >= self.max_len:
                reason = "length"
        if reason is not None:
            tail = s.decoder.flush()
            if tail:
                s.on_event(("delta", tail))
        return reason

    def _drop_cancelled(self) -> None:
        for s in [s for s in self.running if s.cancelled]:
            self._remove(s)
            s.on_event(("done", "cancelled", len(s.prompt), s.generated))

    def _remove(self, s: Seq) -> None:
        """Free `s`'s row; the last row moves into it so running rows stay 0..n-1."""
        r, last = self.running.index(s), len(self.running) - 1
        if r != last:
            mover = self.running[last]
            L = mover.length
            for c in self.caches:
                c.k[r, :, :L] = c.k[last, :, :L]
                c.v[r, :, :L] = c.v[last, :, :L]
            self.running[r] = mover
        self.running.pop()


def sample_rows(
    logits: torch.Tensor, params: Sequence[SeqParams], gens: Sequence[torch.Generator | None], rng: torch.Generator
) -> torch.Tensor:
    """Each row with its own request's temperature / top-p; a row with a generator (a request
    `seed`) draws from it alone, the others from the engine's `rng`."""
    temps = torch.tensor([p.temperature for p in params], device=logits.device)
    top_p = torch.tensor([p.top_p for p in params], device=logits.device)
    return sample(logits, temps, top_p, generator=rng, row_generators=gens)
