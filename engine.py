"""Generation for any number of prompts: continuous batching with chunked prefill.

    Scheduler   which tokens run next: every running sequence's decode token, then chunks of
                prompts in arrival order, up to the step's token budget; a new prompt takes a free
                KV slot, a finished sequence gives its slot back at once
    Runner      runs a step: a flat Batch through the Weaver, eagerly, or, for decode-only steps,
                by replaying a CUDA graph captured once per batch-size bucket; samples on the device
    Engine      the loop: prompts in, finished sequences out as they complete

Every rank runs the same scheduler on the same tokens (sampled on rank 0 and broadcast), so all
ranks build the same steps without talking about them. Memory is fixed at the start: the KV cache
holds max_seqs sequences of max_len positions, the comm buffers one step of the budget.
"""
import collections
import dataclasses
import time

import torch
import torch.distributed as dist

from comm import broadcast_from_rank0
from weave import Batch, Weaver


@dataclasses.dataclass(eq=False)
class Sequence:
    index: int               # the prompt's position in the input
    prompt: list
    max_new: int
    out: list = dataclasses.field(default_factory=list)
    error: str | None = None
    slot: int = -1
    cached: int = 0          # tokens whose K/V are in the cache
    t_admit: float = 0.0     # when its first chunk ran, its first token came, it finished
    t_first: float = 0.0
    t_done: float = 0.0

    def next_tokens(self, n: int) -> list:
        """The n tokens after the cached ones: a prompt chunk, or the last sampled token."""
        if self.cached < len(self.prompt):
            return self.prompt[self.cached:self.cached + n]
        return self.out[self.cached - len(self.prompt):][:n]


# ----------------------------------------------------------------------------- scheduler


class Scheduler:
    """Packs each step: one token for every running sequence past its prompt, then prompt chunks,
    oldest first, while the budget lasts. max_seqs <= budget, so every running sequence advances
    every step and the oldest unfinished prompt always gets at least one token: none starves."""

    def __init__(self, max_seqs: int, budget: int):
        if not 1 <= max_seqs <= budget:
            raise ValueError(f"need 1 <= max_seqs <= max_step_tokens (got {max_seqs} and {budget}): "
                             f"every running sequence decodes one token per step")
        self.budget = budget
        self.waiting, self.running = collections.deque(), []
        self.free = list(range(max_seqs - 1, -1, -1))   # KV slots; pop() takes the lowest

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def __bool__(self):
        return bool(self.waiting or self.running)

    def schedule(self) -> list:
        """[(sequence, number of tokens)] for the next step, decode tokens first."""
        step = [(s, 1) for s in self.running if s.cached >= len(s.prompt)]
        left = self.budget - len(step)
        for s in self.running:
            if s.cached < len(s.prompt) and left > 0:
                n = min(len(s.prompt) - s.cached, left)
                step.append((s, n))
                left -= n
        while self.waiting and self.free and left > 0:
            s = self.waiting.popleft()
            s.slot = self.free.pop()
            self.running.append(s)
            n = min(len(s.prompt), left)
            step.append((s, n))
            left -= n
        return step

    def finish(self, seq: Sequence):
        self.running.remove(seq)
        self.free.append(seq.slot)


# ----------------------------------------------------------------------------- runner


def sample(logits, temperature: float, top_p: float, g: torch.Generator | None):
    """logits (B, V) -> (B,) next tokens, on the device, no host sync. Sampling is an exponential
    race: argmax(p / E) with E ~ Exp(1) picks token i with probability p_i (what multinomial does)."""
    if temperature == 0:
        return logits.argmax(-1)
    p = torch.softmax(logits.float() / temperature, dim=-1)
    idx = None
    if top_p < 1:
        p, idx = p.sort(dim=-1, descending=True)
        p = p.masked_fill(p.cumsum(-1) - p >= top_p, 0)   # drop tokens once the kept mass reaches top_p
    choice = (p / torch.empty_like(p).exponential_(generator=g)).argmax(-1)
    return choice if idx is None else idx.gather(-1, choice[:, None])[:, 0]


def buckets(max_seqs: int) -> list:
    """Batch sizes with a captured decode graph: a step pads to the next one up."""
    return sorted({b for b in [1, 2, 4, 8, *range(16, max_seqs + 16, 16)] if b < max_seqs} | {max_seqs})


class Runner:
    """Runs steps. Decode-only steps replay a CUDA graph of their bucket: the graph was captured
    over a Batch whose tensors are views of one static int32 buffer, and a step only copies its
    layout into that buffer. Padding rows decode in a scratch slot that no sequence uses. The graphs
    keep the addresses of the model's KV cache, which the Runner allocates: one Runner per model at a
    time."""

    def __init__(self, weaver: Weaver, max_seqs: int, max_len: int, graphs: bool,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0):
        self.weaver, self.d = weaver, weaver.comm.d
        self.max_len, self.scratch = max_len, max_seqs
        self.temperature, self.top_p = temperature, top_p
        self.g = torch.Generator(self.d.device).manual_seed(seed)
        weaver.model.allocate_cache(max_seqs + 1, max_len)
        self.graphs = {}
        if graphs:
            if self.d.device.type != "cuda":
                raise ValueError("CUDA graphs need a CUDA device; use graphs off on the CPU")
            self.capture(buckets(max_seqs))

    @torch.no_grad()
    def capture(self, sizes):
        pool = torch.cuda.graph_pool_handle()
        for bs in sorted(sizes, reverse=True):     # the largest first: the others reuse its memory
            seqs = [(self.scratch, 0, 1)] * bs
            data = Batch.layout(seqs, [0] * bs, self.max_len).to(self.d.device)
            batch = Batch.view(seqs, data)
            side = torch.cuda.Stream()             # warm-up (lazy inits, workspaces) off the capture
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.weaver(batch)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.weaver(batch)
            self.graphs[bs] = graph, data, logits

    @torch.no_grad()
    def step(self, seqs: list, token_ids: list) -> torch.Tensor:
        """seqs [(slot, start, n)] and their tokens -> (len(seqs),) next tokens on the device."""
        B = len(seqs)
        bucket = min((b for b in self.graphs if b >= B), default=None) if all(n == 1 for *_, n in seqs) else None
        if bucket is None:
            logits = self.weaver(Batch.make(seqs, token_ids, self.d.device, self.max_len))
        else:
            graph, data, logits = self.graphs[bucket]
            pad = bucket - B
            data.copy_(Batch.layout(seqs + [(self.scratch, 0, 1)] * pad, token_ids + [0] * pad, self.max_len),
                       non_blocking=True)
            graph.replay()
        return broadcast_from_rank0(sample(logits[:B], self.temperature, self.top_p, self.g), self.d)


# ----------------------------------------------------------------------------- the loop


class Engine:
    def __init__(self, weaver: Weaver, max_seqs: int, max_step_tokens: int, max_len: int,
                 graphs: bool = False, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, log=None):
        model = weaver.model
        if max_step_tokens > weaver.comm.max_tokens:
            raise ValueError(f"max_step_tokens {max_step_tokens} exceeds the comm buffers "
                             f"({weaver.comm.max_tokens} tokens)")
        max_len = min(max_len, model.cfg.max_positions)
        self.max_seqs = fit_slots(model, weaver.comm.d, max_seqs, max_len, log)
        self.max_len, self.context = max_len, model.cfg.max_positions
        self.scheduler = Scheduler(self.max_seqs, max_step_tokens)
        self.runner = Runner(weaver, self.max_seqs, max_len, graphs, temperature, top_p, seed)

    def check(self, seq: Sequence) -> str | None:
        """Why this prompt cannot run, or None."""
        n = len(seq.prompt)
        if n == 0:
            return "the prompt has no tokens"
        if n + seq.max_new > self.context:
            return (f"the prompt has {n} tokens: with {seq.max_new} new tokens it exceeds the model's context "
                    f"of {self.context}; shorten it or ask for fewer new tokens")
        if n + seq.max_new > self.max_len:
            return f"the prompt has {n} tokens: with {seq.max_new} new tokens it exceeds the KV cache's {self.max_len} positions"
        return None

    def generate(self, prompts, max_new: int, eos=(), on_token=None, on_step=None):
        """Yields each prompt's Sequence as it finishes (or fails its check), with .out and timings.
        prompts: token id lists; on_token(seq, token) is called for every new token, on_step(step,
        seconds) after every step ([(sequence, tokens)], its time from scheduling to its tokens)."""
        sched, eos = self.scheduler, set(eos)
        for i, p in enumerate(prompts):
            seq = Sequence(i, list(p), max_new)
            seq.error = self.check(seq)
            if seq.error:
                yield seq
            else:
                sched.add(seq)
        while sched:
            step = sched.schedule()
            start = time.perf_counter()
            for s, _ in step:
                s.t_admit = s.t_admit or start
            tokens = [t for s, n in step for t in s.next_tokens(n)]
            nxt = self.runner.step([(s.slot, s.cached, n) for s, n in step], tokens).tolist()
            now = time.perf_counter()
            if on_step:
                on_step(step, now - start)
            for (s, n), t in zip(step, nxt):
                s.cached += n
                if s.cached < len(s.prompt):   # a prompt chunk that does not end the prompt
                    continue
                s.out.append(t)
                s.t_first = s.t_first or now
                if on_token:
                    on_token(s, t)
                if t in eos or len(s.out) == s.max_new:
                    s.t_done = now
                    sched.finish(s)
                    yield s


def fit_slots(model, d, max_seqs: int, max_len: int, log=None) -> int:
    """max_seqs, lowered where the KV cache would not fit in 90% of the free GPU memory (the same on
    every rank: they must schedule alike)."""
    if d.device.type != "cuda":
        return max_seqs
    free = torch.tensor(torch.cuda.mem_get_info(d.device)[0], device=d.device)
    if d.world > 1:
        dist.all_reduce(free, op=dist.ReduceOp.MIN)
    per_slot = model.cache_bytes(1, max_len)
    fits = int(0.9 * free.item()) // per_slot - 1        # one slot is the graphs' scratch slot
    if fits < 1:
        raise ValueError(f"the KV cache of one sequence of {max_len} positions ({per_slot / 2**30:.1f} GiB) "
                         f"does not fit in the free GPU memory; ask for fewer new tokens or use more GPUs")
    if fits < max_seqs and log:
        log(f"KV cache: {fits} running sequences fit in GPU memory (asked for {max_seqs})")
    return min(max_seqs, fits)
