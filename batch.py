"""One step's tokens, as the model, the weave and the engine share them.

A step is flat: the tokens of several sequences back to back, T in all, no padding between them.
Each sequence contributes a `Span`: n tokens from position `start`. Its keys and values live in one
contiguous range of KV-cache rows, position p at row `row + p`, so attention reads them in place.

Everything a step reads on the device is one int32 vector, laid out on the host and copied once:
a CUDA graph replays a step over the same buffer with new contents. Attention needs, per sequence,
where its queries are (cu_q), where its keys start (kv_starts) and how many it has (kv_lens, which
is also the position of its next token). Those are laid out per *part*: the whole step, or each
half when the weave splits it. The engine puts decode tokens first, so a part's spans of one token
(n_single) are a prefix of it: attention runs them in one call and the prompt chunks in another
(cu_c: the chunks' query starts from 0).
"""
import array
import dataclasses
import itertools

import torch


@dataclasses.dataclass(frozen=True)
class Span:
    """One sequence's tokens in a step: n tokens from position `start`; its K/V rows start at `row`."""
    row: int
    start: int
    n: int


def split_spans(spans: list, S: int):
    """The spans of tokens [0, S) and [S, T), and whether A's last span goes on in B (a sequence
    that straddles S: its A-part writes its K/V first, so its B-part attends to them)."""
    a, b, off, straddles = [], [], 0, False
    for s in spans:
        k = min(max(S - off, 0), s.n)     # how many of this sequence's tokens fall before S
        if k:
            a.append(Span(s.row, s.start, k))
        if s.n - k:
            b.append(Span(s.row, s.start + k, s.n - k))
        straddles |= 0 < k < s.n
        off += s.n
    return a, b, straddles


@dataclasses.dataclass
class Batch:
    """A step (or one half of it) over views of the step's device vector."""
    spans: list              # [Span], in token order
    tokens: torch.Tensor     # (T,) token ids
    positions: torch.Tensor  # (T,) position of each token in its sequence
    kv_rows: torch.Tensor    # (T,) the cache row of each token's K/V: span.row + position
    seq_ids: torch.Tensor    # (n,) the caller's id of each span's sequence (the sampler keys on it) ...
    next_pos: torch.Tensor   # (n,) ... and the position of the token sampled after it: start + n
    # Attention and logits, per part (None on a split step's whole: its halves hold them):
    last_rows: torch.Tensor | None  # (spans whose last token is here,) their rows, from 0 in this part
    cu_q: torch.Tensor | None       # (n + 1,) where each span's queries start, and T
    cu_c: torch.Tensor | None       # (n - n_single + 1,) the same for the spans after the single ones, from 0
    kv_starts: torch.Tensor | None  # (n + 1,) each span's first cache row (the last entry unused)
    kv_lens: torch.Tensor | None    # (n,) keys each span's queries see: start + n
    n_single: int            # spans of one token at the front (decode tokens)
    max_q: int               # the longest span, and ...
    max_k: int               # ... the most keys a span sees (or more): attention sizes its grid and
    halves: tuple | None = None   # its split of the keys by them. (A, B) when the step is split

    @property
    def T(self) -> int:
        return self.tokens.shape[0]

    @staticmethod
    def layout(spans: list, tokens: list, seq_ids: list | None = None, split_at: int | None = None) -> torch.Tensor:
        """The step's device vector, on the host: tokens, positions, kv_rows (T each), seq_ids and
        next_pos (n each), then per part (the whole, or halves A and B): last_rows, cu_q, cu_c,
        kv_starts, kv_lens."""
        T = sum(s.n for s in spans)
        if len(tokens) != T:
            raise ValueError(f"{len(tokens)} token ids for spans of {T} tokens")
        out = [list(tokens), [s.start + i for s in spans for i in range(s.n)],
               [s.row + s.start + i for s in spans for i in range(s.n)],
               list(seq_ids) if seq_ids is not None else [0] * len(spans), [s.start + s.n for s in spans]]
        for part, continues in _parts(spans, split_at):
            ends, single = list(itertools.accumulate(s.n for s in part)), count_single(part)
            out += [[e - 1 for e in ends[:len(ends) - continues]], [0, *ends], [0, *(e - single for e in ends[single:])],
                    [s.row for s in part] + [0], [s.start + s.n for s in part]]
        # array -> tensor without a Python int per element: a third of torch.tensor(list)'s time
        return torch.frombuffer(array.array("i", list(itertools.chain.from_iterable(out))), dtype=torch.int32)

    @classmethod
    def view(cls, spans: list, data: torch.Tensor, split_at: int | None = None, max_k: int | None = None) -> "Batch":
        """The Batch of `spans` over `data`, a vector laid out by `layout` (on the device). Split, its
        halves hold the attention fields and the whole only the token rows. max_k: the bound on any
        span's keys (a graph replays over steps of any context up to it); default this step's."""
        T, n, off = sum(s.n for s in spans), len(spans), 0

        def take(k):
            nonlocal off
            off += k
            return data[off - k:off]
        tokens, positions, kv_rows, seq_ids, next_pos = take(T), take(T), take(T), take(n), take(n)
        parts, lo, first = [], 0, 0
        for part, continues in _parts(spans, split_at):
            m, t, single = len(part), sum(s.n for s in part), count_single(part)
            parts.append(cls(part, tokens[lo:lo + t], positions[lo:lo + t], kv_rows[lo:lo + t],
                             seq_ids[first:first + m], next_pos[first:first + m], take(m - continues),
                             take(m + 1), take(m - single + 1), take(m + 1), take(m), single, max(s.n for s in part),
                             max_k or max(s.start + s.n for s in part)))
            lo, first = lo + t, first + m - continues
        if split_at is None:
            return parts[0]
        return cls(list(spans), tokens, positions, kv_rows, seq_ids, next_pos, None, None, None, None, None,
                   count_single(spans), max(s.n for s in spans), max_k or max(s.start + s.n for s in spans), tuple(parts))

    @classmethod
    def make(cls, spans: list, tokens: list, device, seq_ids: list | None = None, split_at: int | None = None):
        """A Batch on `device`: layout, one copy, views; split_at: where half B starts, or None."""
        return cls.view(spans, upload(cls.layout(spans, tokens, seq_ids, split_at), device), split_at)


def upload(host: torch.Tensor, device, out: torch.Tensor | None = None) -> torch.Tensor:
    """host on `device` (into `out` if given), without waiting: through pinned memory when it goes
    to a GPU, since a copy from pageable memory may wait for the stream to drain, and the engine
    enqueues a step while the one before it still runs."""
    if torch.device(device).type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True) if out is None else out.copy_(host, non_blocking=True)


def count_single(spans) -> int:
    """How many spans at the front have one token each."""
    n = 0
    while n < len(spans) and spans[n].n == 1:
        n += 1
    return n


def _parts(spans, split_at):
    """[(spans of a part, whether its last span goes on in the next part)]."""
    if split_at is None:
        return [(spans, False)]
    if not 0 < split_at < sum(s.n for s in spans):
        raise ValueError(f"split point {split_at} must fall inside the step's {sum(s.n for s in spans)} tokens")
    a, b, straddles = split_spans(spans, split_at)
    return [(a, straddles), (b, False)]
