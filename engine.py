"""Generation for any number of prompts: continuous batching with chunked prefill, and the Python API.

    KVCache     the cache's rows as ranges: a sequence holds one contiguous range of its prompt +
                max new tokens, from one pool sized to the memory the run can use
    Scheduler   which tokens run next: every running sequence's decode token, then chunks of
                prompts in arrival order, up to the step's token budget; a prompt is admitted when
                its range is free, a finished sequence gives its range back at once
    Runner      runs a step: a flat Batch through the Weaver, eagerly, or, for decode-only steps,
                by replaying a CUDA graph captured per batch-size bucket; samples on the device
    Engine      the loop: sizes the pool for the prompts it is given, yields sequences as they finish
    LLM         the one construction path (checkpoint -> model -> comm -> Weaver -> Engine)

Every rank runs the same scheduler on the same tokens (sampled on rank 0 and broadcast), so all
ranks build the same steps without talking about them.
"""
import bisect
import collections
import dataclasses
import gc
import os
import time
import typing

import torch
import torch.distributed as dist

import fastpath
import models
from batch import Batch, Span, upload
from comm import check_comm, make_comm
from group import UserError, agree, broadcast_from_rank0, init_distributed
from weave import Tuning, Weaver, tuning_path


@dataclasses.dataclass(eq=False)
class Sequence:
    index: int               # the prompt's position in the input: its id for the sampler too
    prompt: list             # token ids
    max_new: int
    out: list = dataclasses.field(default_factory=list)
    text: str | None = None  # out decoded (LLM.generate, with a tokenizer)
    error: str | None = None
    finish: str | None = None  # why it ended: "stop" (an end-of-sequence token) or "length" (max_new)
    row: int = -1            # first row of its cache range
    # Counted when a step is scheduled, so that the next step can be scheduled (and launched) while
    # this one runs: the tokens whose K/V are in the cache once the scheduled steps ran, and the
    # tokens those steps sample (out holds the ones that arrived).
    cached: int = 0
    sampled: int = 0
    done: bool = False
    t_admit: float = 0.0     # when its first chunk ran, its first token came, it finished
    t_first: float = 0.0
    t_done: float = 0.0

    @property
    def need(self) -> int:
        return cache_need(len(self.prompt), self.max_new)


class Work(typing.NamedTuple):
    """A sequence's part of a step: n tokens from position start."""
    seq: Sequence
    n: int
    start: int

    @property
    def samples(self) -> bool:   # the step samples a token for it: a decode token, or its prompt's last chunk
        return self.start + self.n >= len(self.seq.prompt)


def cache_need(prompt: int, max_new: int) -> int:
    """Cache rows a sequence holds while it runs: its prompt and every new token but the last."""
    return prompt + max_new - 1


# ----------------------------------------------------------------------------- cache and scheduler


class KVCache:
    """Free ranges of the pool's rows, sorted by start; best fit, neighbours merged when a range comes
    back. Contiguous ranges (not pages) because FlashAttention reads each sequence's keys from one
    base row here (torch 2.11 has no block table)."""

    def __init__(self, rows: int):
        self.rows, self.free = rows, [(0, rows)] if rows else []

    def alloc(self, n: int) -> int | None:
        fits = [(size, start) for start, size in self.free if size >= n]
        if not fits:
            return None
        size, start = min(fits)
        i = bisect.bisect_left(self.free, (start, size))
        self.free[i:i + 1] = [(start + n, size - n)] if size > n else []
        return start

    def release(self, start: int, n: int):
        i = bisect.bisect_left(self.free, (start, n))
        if i < len(self.free) and self.free[i][0] == start + n:         # merge with the range after
            n += self.free.pop(i)[1]
        if i and self.free[i - 1][0] + self.free[i - 1][1] == start:    # ... and the one before
            start, n = self.free[i - 1][0], self.free[i - 1][1] + n
            i -= 1
            self.free.pop(i)
        self.free.insert(i, (start, n))

    @property
    def free_rows(self) -> int:
        return sum(n for _, n in self.free)


class Scheduler:
    """Packs each step: one token for every running sequence past its prompt, then prompt chunks,
    oldest first, while the budget lasts. A waiting prompt is admitted, in arrival order, when a range
    of the cache holds it and fewer than max_seqs run; one that does not fit waits (it never evicts
    another). max_seqs <= budget, so every running sequence advances every step and the oldest
    unfinished prompt always gets a token: none starves."""

    def __init__(self, max_seqs: int, budget: int, cache: KVCache):
        self.check_limits(max_seqs, budget)
        self.max_seqs, self.budget, self.cache = max_seqs, budget, cache
        self.waiting, self.running = collections.deque(), []

    @staticmethod
    def check_limits(max_seqs: int, budget: int):
        if not 1 <= max_seqs <= budget:
            raise UserError(f"need 1 <= max_seqs <= max_step_tokens (got {max_seqs} and {budget}): "
                            f"every running sequence decodes one token per step")

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def __bool__(self):
        return bool(self.waiting or self.running)

    def schedule(self) -> list:
        """[Work] of the next step, decode tokens first, counted as done (cached, sampled): the
        step after it can be scheduled before its tokens arrive. A sequence that has all its tokens
        scheduled gets no more; one that stops at EOS may get one more step, whose token is dropped."""
        step = [Work(s, 1, s.cached) for s in self.running
                if s.cached >= len(s.prompt) and s.sampled < s.max_new and not s.done]
        left = self.budget - len(step)
        for s in self.running:
            if s.cached < len(s.prompt) and left > 0:
                step.append(Work(s, min(len(s.prompt) - s.cached, left), s.cached))
                left -= step[-1].n
        while self.waiting and left > 0 and len(self.running) < self.max_seqs:
            s = self.waiting[0]
            if (row := self.cache.alloc(s.need)) is None:
                break
            self.waiting.popleft()
            s.row = row
            self.running.append(s)
            step.append(Work(s, min(len(s.prompt), left), 0))
            left -= step[-1].n
        for w in step:
            w.seq.cached += w.n
            w.seq.sampled += w.samples
        return step

    def postprocess(self, step: list, tokens: list, eos: set, now: float):
        """After a step: the new tokens [(sequence, token)] and the sequences that finished (their
        ranges freed: a step still in flight may write there, but any later use of them is
        enqueued after it). A chunk that does not end its prompt samples nothing."""
        new, done = [], []
        for w, t in zip(step, tokens):
            s = w.seq
            if not w.samples or s.done:
                continue
            s.out.append(t)
            s.t_first = s.t_first or now
            new.append((s, t))
            if t in eos or len(s.out) == s.max_new:
                s.t_done, s.done, s.finish = now, True, "stop" if t in eos else "length"
                self.running.remove(s)
                self.cache.release(s.row, s.need)
                done.append(s)
        return new, done


# ----------------------------------------------------------------------------- runner


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0     # 0: greedy
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:   # a temperature that rounds to 0 in fp32 would divide by zero
        return float(torch.tensor(self.temperature, dtype=torch.float32)) == 0


def greedy(logits):
    """(B, V) -> (B,) the first index of each row's maximum."""
    return logits.argmax(-1)


def sample(logits, s: Sampling, seq_ids, positions, argmax=greedy):
    """logits (B, V) -> (B,) next tokens, on the device, no host sync. Inverse-CDF sampling with one
    uniform per row drawn from (seed, sequence id, position) alone, so a sequence's text does not
    depend on what runs beside it; top-p keeps the most likely tokens up to that mass (and always
    the first). argmax: greedy's, or the fast path's kernel."""
    if s.greedy:
        return argmax(logits)
    x = logits.float()
    p = torch.softmax((x - x.amax(-1, keepdim=True)) / s.temperature, dim=-1)   # no overflow at tiny T
    idx = None
    if s.top_p < 1:
        p, idx = p.sort(dim=-1, descending=True)
        drop = p.cumsum(-1) - p >= s.top_p
        drop[:, 0] = False
        p = p.masked_fill(drop, 0)
    c = p.cumsum(-1)                                                           # (B, V)
    total = c[:, -1:]
    u = torch.minimum(uniform(s.seed, seq_ids, positions)[:, None].float() * total,
                      torch.nextafter(total, torch.zeros_like(total)))         # in [0, total)
    choice = torch.searchsorted(c, u, right=True)[:, 0]                       # first c > u: p > 0 there
    return choice if idx is None else idx.gather(-1, choice[:, None])[:, 0]


def uniform(seed: int, seq_ids, positions):
    """(B,) uniforms in [0, 1) from a counter-based hash of (seed, id, position): int64 arithmetic on
    32-bit values, so no product overflows."""
    M = 0xFFFFFFFF

    def mix(x):    # a 32-bit integer hash (xor-shift-multiply)
        for _ in range(2):
            x = ((x ^ (x >> 16)) * 0x45D9F3B) & M
        return x ^ (x >> 16)
    h = mix(torch.full_like(seq_ids, seed & M, dtype=torch.int64) ^ (seed >> 32 & M))
    for v in (seq_ids, positions):
        h = mix((h + 0x9E3779B9 + v.long()) & M)
    return (h >> 8).double() / 2 ** 24


def buckets(max_seqs: int) -> list:
    """Batch sizes with a captured decode graph: a step pads to the next one up."""
    return sorted({b for b in [1, 2, 4, 8, *range(16, max_seqs + 16, 16)] if b < max_seqs} | {max_seqs})


def capture_graph(fn, pool=None):
    """fn() captured into a CUDA graph, after one warm-up call on a side stream (lazy inits and
    workspaces, which a capture must not do): (graph, what fn returned while captured)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


class Runner:
    """Runs steps over a cache of `rows` rows (plus one scratch row that padding rows decode into).
    Decode-only steps replay a CUDA graph of their bucket: the graph was captured over a Batch whose
    tensors are views of one static int32 buffer, and a step only copies its layout into that buffer.
    A graph serves sequences of up to max_k positions: attention sizes its grids by that bound (the
    decode kernel its key slices, FlashAttention its splits), so it is the run's longest sequence,
    not the model's context. The graphs keep the addresses of the model's KV cache, which the Runner
    allocates: one Runner per model at a time. argmax: greedy sampling's (greedy, or the fast path's)."""

    def __init__(self, weaver: Weaver, rows: int, graphs: bool, max_k: int | None = None, argmax=greedy):
        self.weaver, self.d, self.scratch = weaver, weaver.comm.d, rows
        self.use_graphs, self.max_k, self.argmax = graphs, max_k or rows, argmax
        if graphs and self.d.device.type != "cuda":
            raise UserError("CUDA graphs need a CUDA device; use graphs off on the CPU")
        weaver.model.allocate_cache(rows + 1)
        self.graphs, self.pool = {}, None
        self.steps, self.split_steps, self.last_split = 0, 0, None   # what the weave did: (tokens, half A's)

    @torch.no_grad()
    def capture(self, sizes):
        """Decode graphs for these batch sizes (those not captured yet), the largest first: the
        others reuse its memory."""
        if not self.use_graphs:
            return
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        for bs in sorted(set(sizes) - set(self.graphs), reverse=True):
            spans, split_at = [Span(self.scratch, 0, 1)] * bs, self.weaver.split_at(bs)
            data = Batch.layout(spans, [0] * bs, split_at=split_at).to(self.d.device)    # the graph's static buffer
            batch = Batch.view(spans, data, split_at, self.max_k)
            graph, logits = capture_graph(lambda: self.weaver(batch), self.pool)
            self.graphs[bs] = graph, data, batch, logits

    @torch.no_grad()
    def step(self, spans: list, tokens: list, seq_ids: list, sampling: Sampling, carry=None) -> torch.Tensor:
        """Spans and their tokens -> (len(spans),) next tokens on the device (rank 0's, on every rank).
        carry = (prev, [(i, j)]): token i of this step is prev[j], the output of the step before,
        still on the device (its host value is a placeholder)."""
        B = len(spans)
        bucket = min((b for b in self.graphs if b >= B), default=None) if all(s.n == 1 for s in spans) else None
        if bucket is None:
            batch = self.weaver.batch(spans, tokens, seq_ids)
            data = batch.tokens
        else:
            graph, data, batch, logits = self.graphs[bucket]
            pad = bucket - B
            upload(Batch.layout(spans + [Span(self.scratch, 0, 1)] * pad, tokens + [0] * pad, seq_ids + [0] * pad,
                                self.weaver.split_at(bucket)), self.d.device, out=data)
        if carry:                     # the step's first T entries are its tokens (batch.py)
            prev, pairs = carry
            at = upload(torch.tensor(pairs, dtype=torch.long), self.d.device)   # (m, 2)
            data[at[:, 0]] = prev[at[:, 1]].to(data.dtype)
        if bucket is None:
            logits = self.weaver(batch)
        else:
            graph.replay()
        self.steps += 1
        if batch.halves:
            self.split_steps, self.last_split = self.split_steps + 1, (batch.T, batch.halves[0].T)
        nxt = sample(logits[:B], sampling, batch.seq_ids[:B], batch.next_pos[:B], self.argmax)
        return broadcast_from_rank0(nxt, self.d)


# ----------------------------------------------------------------------------- the loop


class Engine:
    """Sizes the KV pool for the prompts it is given (no more than max_seqs of them at once can
    use, no more than `memory` of the GPU allows), then runs them. Everything it allocates comes
    once per size: a later call that fits reuses the pool and the graphs."""

    def __init__(self, weaver: Weaver, max_seqs: int, max_step_tokens: int, graphs: bool = False,
                 memory: float = 0.9, argmax=greedy):
        if max_step_tokens > weaver.comm.max_tokens:
            raise UserError(f"max_step_tokens {max_step_tokens} exceeds the comm buffers "
                            f"({weaver.comm.max_tokens} tokens)")
        if not 0 < memory <= 1:
            raise UserError(f"the memory fraction must be in (0, 1], got {memory}")
        self.weaver, self.d, self.model = weaver, weaver.comm.d, weaver.model
        self.max_seqs, self.budget, self.graphs, self.memory = max_seqs, max_step_tokens, graphs, memory
        self.argmax = argmax
        Scheduler.check_limits(max_seqs, max_step_tokens)
        self.runner, self.rows, self.cap, self.activations = None, 0, None, None

    def prepare(self, prompts: list, max_new: int):
        """Sizes the pool for these prompts (the most that max_seqs of them can hold at once, within
        memory) and captures decode graphs for the batch sizes they can reach."""
        context = self.model.cfg.max_positions
        ok = [len(p) for p in prompts if p and len(p) + max_new <= context]   # those that can run at all
        needs = sorted(cache_need(n, max_new) for n in ok) or [1]
        want = sum(needs[-self.max_seqs:])
        if self.cap is None:
            self.cap = self.fits()
        if self.runner is None or min(want, self.cap) > self.rows or needs[-1] > self.runner.max_k:
            self.runner = None                                       # the old pool (and graphs) go first
            self.model.allocate_cache(0)
            self.rows = max(self.rows, min(want, self.cap), 1)
            self.runner = Runner(self.weaver, self.rows, self.graphs, min(needs[-1], self.rows), self.argmax)
        self.runner.capture([b for b in buckets(self.max_seqs) if b <= max(1, min(self.max_seqs, len(ok)))])

    def fits(self) -> int:
        """Cache rows that fit: in `memory` of the GPU (counting what is there already, and room for
        a full step's activations and the graphs), or of the host's available memory; the same on
        every rank (the smallest), since all must schedule alike."""
        per_row = self.model.cache_bytes(1)
        spare = models.spare_bytes(self.d, self.memory)   # before measuring the activations: the allocator keeps them
        if self.d.device.type == "cuda":
            spare -= 2 * self.activation_bytes() + 2**28
        rows = torch.tensor(max(int(spare // per_row) - 1, 0), device=self.d.device)   # -1: the scratch row
        if self.d.world > 1:
            dist.all_reduce(rows, op=dist.ReduceOp.MIN)
        return int(rows)

    @torch.no_grad()
    def activation_bytes(self) -> int:
        """The memory one full step takes beyond the weights (measured once, on a step of the whole
        budget over max_seqs sequences, sampled with top-p: the largest logits and sort)."""
        if self.activations is None:
            n, T = min(self.max_seqs, self.budget), self.budget
            spans = [Span(0, 0, T // n + (i < T % n)) for i in range(n)]
            try:
                self.model.allocate_cache(max(s.n for s in spans))
                torch.cuda.synchronize(self.d.device)
                torch.cuda.reset_peak_memory_stats(self.d.device)
                base = torch.cuda.memory_allocated(self.d.device)
                logits = self.weaver(self.weaver.batch(spans, [0] * T, list(range(n))))
                sample(logits, Sampling(1.0, 0.9), torch.zeros(n, dtype=torch.int32, device=self.d.device),
                       torch.zeros(n, dtype=torch.int32, device=self.d.device))
                torch.cuda.synchronize(self.d.device)
                self.activations = torch.cuda.max_memory_allocated(self.d.device) - base
            except torch.OutOfMemoryError:
                raise UserError(f"one step of --max-step-tokens {T} tokens does not fit in GPU memory beside the "
                                f"model; lower --max-step-tokens, or use more GPUs") from None
            finally:
                self.model.allocate_cache(0)
        return self.activations

    def check(self, seq: Sequence) -> str | None:
        """Why this prompt cannot run, or None."""
        n, context = len(seq.prompt), self.model.cfg.max_positions
        if n == 0:
            return "the prompt has no tokens"
        lo, hi = min(seq.prompt), max(seq.prompt)
        if lo < 0 or hi >= self.model.cfg.vocab:
            return (f"the prompt has token id {lo if lo < 0 else hi}, outside the model's vocabulary of "
                    f"{self.model.cfg.vocab} (ids 0 to {self.model.cfg.vocab - 1}); check the tokenizer that made it")
        if n + seq.max_new > context:
            return (f"the prompt has {n} tokens: with {seq.max_new} new tokens it exceeds the model's context "
                    f"of {context}; shorten it, or ask for at most {context - n} new tokens (--max-new-tokens)"
                    if n < context else f"the prompt has {n} tokens: it exceeds the model's context of {context} by "
                                        f"itself; shorten it")
        if seq.need > self.rows:
            fewer = (f"ask for at most {self.rows - n + 1} new tokens (--max-new-tokens), "
                     if self.rows >= n else "shorten it, ")
            return (f"the prompt has {n} tokens: with {seq.max_new} new tokens it needs {seq.need} positions of KV "
                    f"cache, more than the {self.rows} that fit in memory (--memory {self.memory:g}); {fewer}raise "
                    f"--memory, or use more GPUs")
        return None

    def generate(self, prompts, max_new: int, eos=(), sampling: Sampling = Sampling(), on_token=None, on_step=None):
        """Yields each prompt's Sequence as it finishes (or fails its check), with .out and timings.
        prompts: token id lists; on_token(seq, token) is called for every new token, on_step(step,
        seconds) after every step ([Work], the time since the previous step's tokens came).
        The host schedules and launches step k+1 before it waits for step k's tokens: decode tokens
        that k samples go from k's output to k+1's input on the device, so the GPU does not wait
        for Python between steps."""
        self.prepare(prompts, max_new)
        seqs = [Sequence(i, list(p), max_new) for i, p in enumerate(prompts)]
        sched, eos = Scheduler(self.max_seqs, self.budget, KVCache(self.rows)), set(eos)
        for s in seqs:
            s.error = self.check(s)
            if s.error:
                yield s
            else:
                sched.add(s)
        flight, last = None, time.perf_counter()      # the step in flight and when the last one's tokens came
        while sched or flight:
            step = sched.schedule() if sched else []
            if not step and flight is None:
                raise RuntimeError("the scheduler has sequences but nothing to run")
            launched = self.launch(step, sampling, flight) if step else None
            if flight is not None:
                tokens = flight.tokens()
                now = time.perf_counter()
                if on_step:
                    on_step(flight.step, now - last)
                new, done = sched.postprocess(flight.step, tokens, eos, now)
                last = now
                if on_token:
                    for s, t in new:
                        on_token(s, t)
                yield from done
            flight = launched

    def launch(self, step: list, sampling: Sampling, flight: "Flight | None") -> "Flight":
        """Enqueues a step; a decode token still on its way from the step in flight is carried over
        on the device."""
        now = time.perf_counter()
        tokens, carry = [], []
        for w in step:
            s = w.seq
            s.t_admit = s.t_admit or now
            if w.start < len(s.prompt):
                tokens += s.prompt[w.start:w.start + w.n]
            elif (j := w.start - len(s.prompt)) < len(s.out):
                tokens.append(s.out[j])
            else:                     # sampled by the step in flight
                carry.append((len(tokens), flight.rows[s]))
                tokens.append(0)
        spans = [Span(w.seq.row, w.start, w.n) for w in step]
        nxt = self.runner.step(spans, tokens, [w.seq.index for w in step], sampling,
                               (flight.nxt, carry) if carry else None)
        return Flight(step, nxt)

    def close(self):
        self.runner = None
        self.model.allocate_cache(0)


class Flight:
    """A launched step: its work and its sampled tokens (on the device, and on their way to the host)."""

    def __init__(self, step: list, nxt: torch.Tensor):
        self.step, self.nxt, self.rows = step, nxt, {w.seq: i for i, w in enumerate(step)}
        self.event = None
        if nxt.is_cuda:               # copied now, so that the wait below does not queue behind the next step
            self.host = torch.empty(nxt.shape, dtype=nxt.dtype, pin_memory=True)
            self.host.copy_(nxt, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = nxt

    def tokens(self) -> list:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


# ----------------------------------------------------------------------------- the API


def default_step_budget(world: int) -> int:
    """The step token budget when none is given. At TP > 1, 2048 as the paper's throughput runs:
    the weave splits such steps and hides their communication. On one GPU nothing is split, and
    larger steps run their GEMMs in fewer, longer waves (a few percent more tokens/s: results.md)."""
    return 8192 if world == 1 else 2048


def check_step_budget(budget: int, max_seqs: int, cfg, dtype, d):
    """A step budget the run can use and hold: no more tokens than max_seqs sequences of the model's
    context can bring to one step, and two step buffers that fit beside the rest."""
    most = max_seqs * cfg.max_positions
    if budget > most:
        raise UserError(f"--max-step-tokens {budget} is more than a step can ever hold: --max-seqs {max_seqs} "
                        f"sequences of the model's context ({cfg.max_positions}) bring at most {most}; lower it")
    per_token = 2 * cfg.hidden * dtype.itemsize                            # the comm's two step buffers
    spare = 0.5 * (torch.cuda.mem_get_info(d.device)[0] if d.device.type == "cuda" else models.available_host_memory())
    if budget * per_token > spare:
        raise UserError(f"--max-step-tokens {budget} needs {budget * per_token / 2**30:.1f} GiB of step buffers, more "
                        f"than this machine has to spare; the largest that fits is {int(spare // per_token)}")


def option(name: str, value, kind, ok=lambda v: True, want: str = ""):
    """value, checked at the API's boundary: an instance of `kind` (int never a bool; float also an
    int) for which ok(value) holds; else a UserError naming the option and what it takes."""
    kinds = (int, float) if kind is float else (kind,)
    if not isinstance(value, kinds) or (kind in (int, float) and isinstance(value, bool)) or not ok(value):
        raise UserError(f"{name} must be {want or kind.__name__}, got {value!r}")
    return value


def prompt_list(prompts) -> list:
    """The prompts as a list: one string is one prompt; otherwise a list (or tuple) of strings and of
    token-id lists."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise UserError(f"prompts must be a list of strings or of token-id lists, got a {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        ids = isinstance(p, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
        if not (isinstance(p, str) or ids):
            hint = "; token ids go in a list of lists, e.g. [[1, 2, 3]]" if isinstance(p, int) else ""
            raise UserError(f"prompt {i} is {p!r}: a prompt is a string or a list of token ids{hint}")
    return list(prompts)


class LLM:
    """Text generation with tensor parallelism over the ranks torchrun started (one process: TP 1):

        with engine.LLM("meta-llama/Llama-3.3-70B-Instruct") as llm:
            for seq in llm.generate(["Explain tensor parallelism"], max_new_tokens=64):
                print(seq.index, seq.text, seq.finish, seq.t_first - seq.t_admit)

    model: a checkpoint directory, a hub id, a preset name (random weights; token-id prompts only)
    or None (the demo). tokenizer: this model's models.Tokenizer if the caller has loaded it already.
    fast: the one-GPU fast path's kernels (fastpath.py) where they can run; off, the plain model.
    max_seqs: sequences generated at once, at most; None: 256, or max_step_tokens if that is lower.
    max_step_tokens: the step's token budget; None: default_step_budget (8192 on one GPU, 2048 at TP > 1),
    or what max_seqs sequences of the model's context can bring to a step if that is less.
    Every option is checked here, and a bad one raises UserError naming it. The model, the comm
    buffers, the KV cache and the graphs are freed by close() (or leaving the with block); the
    process group stays (init_distributed made it).
    """

    def __init__(self, model: str | None = None, *, comm: str = "auto", weave: str = "auto",
                 graphs: str = "auto", tuning=None, max_seqs: int | None = None, max_step_tokens: int | None = None,
                 memory: float = 0.9, device: str = "auto", dtype: torch.dtype | None = None,
                 layers: int | None = None, dist=None, log=None, tokenizer=None, fast: bool = True):
        self.engine = None
        if model is not None:
            option("model", model, str, want="a checkpoint directory, a hub id, a preset name or None")
        if max_seqs is not None:
            option("max_seqs", max_seqs, int, lambda v: v >= 1, "an integer >= 1 or None")
        if max_step_tokens is not None:
            option("max_step_tokens", max_step_tokens, int, lambda v: v >= 1, "an integer >= 1 or None")
        option("memory", memory, float, lambda v: 0 < v <= 1, "a fraction in (0, 1]")
        option("fast", fast, bool, want="True or False")
        if layers is not None:
            option("layers", layers, int, lambda v: v >= 1, "an integer >= 1 or None")
        if tuning is not None and not isinstance(tuning, Tuning):
            option("tuning", tuning, str, want="a weave.Tuning, the path of a table bench.py tune wrote, or None")
        if dtype is not None:
            option("dtype", dtype, torch.dtype, lambda v: v.is_floating_point, "a floating-point torch dtype")
        for name, value, choices in (("graphs", graphs, ("auto", "on", "off")), ("weave", weave, ("auto", "on", "off")),
                                     ("device", device, ("auto", "cuda", "cpu"))):
            option(name, value, str, lambda v: v in choices, " or ".join(choices))
        self.d = dist or init_distributed(device)
        self.log = log or (lambda s: None)
        self.path = models.resolve(model)
        module, cfg = models.config(self.path)
        cuda = self.d.device.type == "cuda"
        dtype = dtype or (getattr(torch, cfg.dtype.replace("torch.", ""), None) if cuda else torch.float32)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise UserError(f"config.json's dtype {cfg.dtype!r} is not a torch floating-point dtype")
        if graphs == "on" and not cuda:
            raise UserError("graphs on needs CUDA; on the CPU use graphs off (or auto)")
        check_comm(comm, self.d, dtype, cfg.hidden)                     # before minutes of loading
        if not isinstance(tuning, Tuning):
            tuning = Tuning.load(tuning or tuning_path(cfg, self.d.world), required=tuning is not None)
        max_seqs = max_seqs or min(256, max_step_tokens or 256)
        max_step_tokens = max_step_tokens or min(default_step_budget(self.d.world), max_seqs * cfg.max_positions)
        Scheduler.check_limits(max_seqs, max_step_tokens)
        check_step_budget(max_step_tokens, max_seqs, cfg, dtype, self.d)
        is_dir = os.path.isdir(self.path)      # else a preset: no tokenizer, token-id prompts only
        has_tokenizer = is_dir and os.path.exists(os.path.join(self.path, "tokenizer.json"))
        self.tokenizer = tokenizer or (models.Tokenizer(self.path, cfg.vocab) if has_tokenizer else None)
        self.eos = models.eos_ids(cfg, self.path if is_dir else None)
        self.model = agree(self.d, lambda: models.load(self.path, self.d, dtype, layers, self.log, memory))
        self.fast = fast and fastpath.enable(self.model)
        try:
            self.comm = make_comm(comm, self.d, cfg.hidden, max_step_tokens, dtype)
        except torch.OutOfMemoryError:
            raise UserError(f"the step buffers of max_step_tokens {max_step_tokens} (--max-step-tokens) do not fit in "
                            f"GPU memory beside the model; lower it, or use more GPUs") from None
        self.weaver = Weaver(self.model, self.comm, weave, tuning)
        self.engine = Engine(self.weaver, max_seqs, max_step_tokens, graphs == "on" or (graphs == "auto" and cuda),
                             memory, fastpath.argmax if self.fast else greedy)

    @property
    def comm_name(self) -> str:
        return self.comm.name + (f"/{self.comm.transport}" if self.comm.name == "fused" else "")

    def check_open(self):
        if self.engine is None:
            raise UserError("this LLM is closed; make a new engine.LLM to generate again")

    def encode(self, prompts, chat: bool = False) -> list:
        """Token ids of the prompts (see prompt_list): text through the tokenizer (in the chat template
        with `chat`), token-id lists as they are."""
        prompts = prompt_list(prompts)
        option("chat", chat, bool, want="True or False")
        texts = [p for p in prompts if isinstance(p, str)]
        if texts and self.tokenizer is None:
            raise UserError(f"{self.path} has no tokenizer: give prompts as token id lists")
        ids = iter(self.tokenizer.encode(texts, chat) if texts else [])
        return [next(ids) if isinstance(p, str) else list(p) for p in prompts]

    def prepare(self, prompts, max_new_tokens: int = 64, chat: bool = False):
        """Sizes the KV cache and captures the decode graphs for these prompts now, so that generate
        starts at once (generate does it too, where it has not been done)."""
        self.check_open()
        option("max_new_tokens", max_new_tokens, int, lambda v: v >= 1, "an integer >= 1")
        self.engine.prepare(self.encode(prompts, chat), max_new_tokens)

    def generate(self, prompts, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, chat: bool = False, on_token=None, on_step=None):
        """An iterator of one Sequence per prompt, each as it finishes (input order is .index): .out
        (token ids), .text, .finish ("stop" at an end-of-sequence token, "length" at
        max_new_tokens), .error (a prompt that cannot run: the others still do), and timings
        (.t_admit, .t_first, .t_done, perf_counter seconds). prompts: a list of strings and of
        token-id lists, or one string. on_token(seq, token) sees every new token, on_step(step,
        seconds) every step. The arguments are checked here, before the first step."""
        self.check_open()
        option("max_new_tokens", max_new_tokens, int, lambda v: v >= 1, "an integer >= 1")
        option("temperature", temperature, float, lambda v: 0 <= v < float("inf"), "a number >= 0 (0 = greedy)")
        option("top_p", top_p, float, lambda v: 0 < v <= 1, "a number in (0, 1] (1 = keep all tokens)")
        option("seed", seed, int, want="an integer")
        for name, fn in (("on_token", on_token), ("on_step", on_step)):
            if fn is not None and not callable(fn):
                raise UserError(f"{name} must be a function or None, got {fn!r}")
        ids = self.encode(prompts, chat)
        return self._generate(ids, max_new_tokens, Sampling(float(temperature), float(top_p), seed), on_token, on_step)

    def _generate(self, ids, max_new_tokens, sampling, on_token, on_step):
        for seq in self.engine.generate(ids, max_new_tokens, self.eos, sampling, on_token, on_step):
            if self.tokenizer is not None and seq.error is None:
                seq.text = self.decode(seq.out)
            yield seq

    def decode(self, ids: list) -> str:
        return self.tokenizer.decode([t for t in ids if t not in self.eos])

    def close(self):
        """Frees the graphs (they captured the comm's collectives), the cache, the comm buffers and
        the model, in that order, and waits for the GPU. Closing twice is harmless."""
        if getattr(self, "engine", None) is not None:
            self.engine.close()
        self.engine = self.weaver = self.comm = self.model = None
        gc.collect()
        if hasattr(self, "d") and self.d.device.type == "cuda":
            torch.cuda.synchronize(self.d.device)
            torch.cuda.empty_cache()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
