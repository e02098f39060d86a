"""The TokenWeave technique, in the order a step runs: the wave-aware split, the tuned table, the
plan (which comm point gets how many CTAs, which GEMMs leave SMs free), the two streams, and the
`Weaver` that executes the plan.

A model is a list of compute stages (embed, attn_0, mlp_0, ..., mlp_{L-1}). Each stage works in
place on a step buffer h (T, H): it reads the normalized input x and leaves this rank's partial
sum. A comm point (comm.py) turns the buffer back into the next stage's x. Above a token threshold
the step (batch.py) is split in two halves A and B, and each half's comm point runs on a side
stream while the other half computes:

    compute(A,k) | comm(A,k) beside compute(B,k) | comm(B,k) beside compute(A,k+1) | ...
"""
import dataclasses
import functools
import json
import math
import os
import warnings

import torch

from batch import Batch
from comm import Comm, padded
from group import UserError

# ----------------------------------------------------------------------------- the wave-aware split

# The wave model's tile, tokens x output features. On one H100, a step split into halves of an odd multiple of 128
# tokens ran slower than its best split on a multiple of 256 at every shape tried, by up to 9% (docs/log.md, 2026-12-07)
GEMM_TILE_M, GEMM_TILE_N = 256, 128


def gemm_waves(m: int, n: int, n_sms: int) -> int:
    return math.ceil(math.ceil(m / GEMM_TILE_M) * math.ceil(n / GEMM_TILE_N) / n_sms)


def wave_split(T: int, gemm_widths, n_sms: int = 132) -> int:
    """Half of T, moved by up to one tile so that both halves' GEMMs fill whole waves.

    The cost model counts waves of (256 x 128)-tiles over the SMs for every GEMM of a layer
    (its local output width in gemm_widths); ties go to the most even split.
    """
    if T < 2 * GEMM_TILE_M:
        return T // 2
    half = round(T / 2 / GEMM_TILE_M) * GEMM_TILE_M
    cost = lambda S: sum(gemm_waves(S, n, n_sms) + gemm_waves(T - S, n, n_sms) for n in gemm_widths)
    candidates = [half + k * GEMM_TILE_M for k in (-1, 0, 1) if 0 < half + k * GEMM_TILE_M < T]
    return min(candidates, key=lambda S: (cost(S), abs(S - T / 2)))


@dataclasses.dataclass
class Tuning:
    """When to split and how many CTAs each comm point gets; from configs/<gpu>-<model>-tp<N>.json
    (written by `bench.py tune`), keyed by token count (nearest key wins)."""
    threshold: int | None = None     # no split below this many tokens (fuse-only); None: the model's weave_threshold
    fuse_ctas: int = 16              # comm CTAs when nothing overlaps (fuse-only, decode)
    attn_ctas: int = 4               # comm CTAs while the other half runs attention
    mlp_ctas: int = 4                # ... while it runs the MLP
    carveout: bool = True            # overlapped GEMMs leave the comm's CTAs their SMs (see Streams, plan)
    table: dict = dataclasses.field(default_factory=dict)   # tokens -> {offset, attn_ctas, mlp_ctas, carveout}

    KNOBS = {"threshold": int, "fuse_ctas": int, "attn_ctas": int, "mlp_ctas": int, "carveout": bool, "offset": int}

    @classmethod
    def load(cls, path: str | None, required: bool = False) -> "Tuning":
        """The table at path; a missing file gives the defaults (an error if `required`)."""
        if not path or not os.path.exists(path):
            if required:
                raise UserError(f"tuning file {path} does not exist (bench.py tune writes one)")
            return cls()
        try:
            with open(path) as f:
                raw = json.load(f)
            if not isinstance(raw, dict) or not isinstance(raw.get("table", {}), dict):
                raise ValueError("not a JSON object with a table")
            table = {int(k): cls.checked(v) for k, v in raw.get("table", {}).items()}
            fields = {f.name for f in dataclasses.fields(cls)} - {"table"}
            return cls(**cls.checked({k: v for k, v in raw.items() if k in fields}), table=table)
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise UserError(f"tuning file {path} is not a table written by bench.py tune ({e}); write it again "
                            f"with bench.py tune") from None

    @classmethod
    def checked(cls, entry: dict) -> dict:
        if not isinstance(entry, dict):
            raise ValueError(f"{entry!r} is not an object")
        for k, v in entry.items():
            kind = cls.KNOBS.get(k)
            if kind and not (isinstance(v, kind) and (kind is bool or not isinstance(v, bool))):
                raise ValueError(f"{k} is {v!r}, not {'true or false' if kind is bool else 'an integer'}")
        return entry

    def save(self, path: str, **about):
        """Writes the table where load reads it; `about` (model, env, ...) goes along for the reader."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(dataclasses.asdict(self) | {"table": {str(k): v for k, v in self.table.items()}} | about, f,
                      indent=1)

    def entry(self, T: int) -> dict:
        if not self.table:
            return {}
        return self.table[min(self.table, key=lambda k: abs(math.log2(k / T)))]

    def split_at(self, T: int, gemm_widths, n_sms: int) -> int:
        """Where half B of a step of T tokens starts: the tuned offset from half, or the wave model."""
        e = self.entry(T)
        if "offset" in e:
            S = round(T / 2 / 256) * 256 + e["offset"]
            if 0 < S < T:
                return S
        return wave_split(T, gemm_widths, n_sms)


def tuning_path(cfg, world: int) -> str:
    """configs/<gpu>-<model type>-h<hidden>-tp<N>.json: keyed by shape, so a real checkpoint finds
    the table that `bench.py tune` wrote for its preset."""
    gpu = torch.cuda.get_device_name().split()[-1].lower() if torch.cuda.is_available() else "cpu"
    name = f"{gpu}-{cfg.model_type}-h{cfg.hidden}-tp{world}.json"
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", name)


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """What one stage of one half gets: the CTAs of the comm point after it, and the SMs its GEMMs
    leave free for the comm kernel that runs beside it (0: nothing runs beside it)."""
    ctas: int
    carveout: int


def plan(kinds: list, halves: int, tuning: Tuning, T: int, world: int) -> list:
    """[stage][half] -> StagePlan, for stages of the given kinds ('embed', 'attn', 'mlp'), for a step
    of T tokens run whole (halves 1) or split (halves 2) over `world` ranks.

    Whole, every comm point runs alone with fuse_ctas. Split, comm(A, k) runs beside compute(B, k)
    and comm(B, k) beside compute(A, k+1): a comm point gets the CTA budget of the stage kind it
    overlaps (the embedding is as short as attention; the last comm point overlaps nothing but the
    LM head), and each stage but A's first carves out the budget of the comm beside it. Only across
    ranks: on one GPU a comm point is an add + RMSNorm of a few µs that takes no CTA budget, and SMs
    left idle for it would only slow the GEMMs.
    """
    if halves == 1:
        return [[StagePlan(tuning.fuse_ctas, 0)] for _ in kinds]
    e = tuning.entry(T)
    carve = tuning.carveout and e.get("carveout", True) and world > 1

    def budget(k):   # CTAs of a comm point running beside stage k
        kind = "mlp" if k < len(kinds) and kinds[k] == "mlp" else "attn"
        return e.get(f"{kind}_ctas", getattr(tuning, f"{kind}_ctas"))
    return [[StagePlan(budget(k), budget(k) if carve and k else 0),   # A: beside comm(B, k-1)
             StagePlan(budget(k + 1), budget(k) if carve else 0)]     # B: beside comm(A, k)
            for k in range(len(kinds))]


# ----------------------------------------------------------------------------- the two streams


class Streams:
    """Compute on the current stream, communication on a high-priority side stream (CUDA); on CPU
    both run inline, so the same schedule runs sequentially. The events are made once and recorded
    again at every comm point: a wait takes the event's latest record when it is issued, and each
    half's done-event is waited for before its next comm point records it again. A split step
    crosses streams at every half-stage, so this runs ~130 times a step of 32 layers: it uses
    torch's thin stream calls, not its context manager or a new event each time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.side = torch.cuda.Stream(device, priority=-1) if self.cuda else None
        self.main = None                      # the compute stream of the step in flight (begin)
        if self.cuda:
            self.fork, self.done = torch.cuda.Event(), [torch.cuda.Event(), torch.cuda.Event()]
        self.carved, self.saved = 0, None     # SMs the GEMMs leave free now; torch's settings before

    def begin(self):
        """A split step starts on the current stream (a graph capture's, say): compute stays there."""
        if self.cuda:
            self.main = torch.cuda.current_stream()

    def comm(self, fn, half: int):
        """Run fn on the side stream after all compute issued so far; returns half's done-event."""
        if not self.cuda:
            fn()
            return None
        self.fork.record(self.main)
        self.side.wait_event(self.fork)
        torch.cuda.set_stream(self.side)
        try:
            fn()
        finally:
            torch.cuda.set_stream(self.main)
        self.done[half].record(self.side)
        return self.done[half]

    def wait(self, event):
        if event is not None:
            self.main.wait_event(event)

    def join(self):
        if self.cuda:
            self.main.wait_stream(self.side)

    def carve(self, sms: int):
        """GEMMs launched from here on run on all SMs but `sms` (0: all, torch's own settings again).
        cuBLAS's Hopper GEMMs are persistent: one CTA per SM, each walking a fixed list of tiles.
        Launched beside a comm kernel that holds some SMs, the CTAs that find no SM wait for the comm
        to finish, and their tiles finish last: the trace showed overlapped GEMMs 1.2-1.8x slower.
        Sized to the comm's CTAs, they all run at once. torch applies the carveout to cuBLASLt's GEMMs
        (and grouped GEMMs) only, so cuBLASLt is chosen here and only here: elsewhere cuBLAS is as
        fast with less host time per call. Only a change calls torch's setters (each warns, and costs
        tens of µs of host time): a step whose attention and MLP budgets are equal sets the carveout
        once and unsets it once; unequal, it changes at every stage."""
        if not self.cuda or sms == self.carved:
            return
        was, self.carved = self.carved, sms   # first: a setter that raises leaves carve(0) to undo it
        with warnings.catch_warnings():   # both setters warn that they are experimental
            warnings.simplefilter("ignore")
            if not was:
                self.saved = torch._C._get_sm_carveout_experimental(), torch.backends.cuda.preferred_blas_library()
            torch._C._set_sm_carveout_experimental(sms or self.saved[0])
            if not was or not sms:
                torch.backends.cuda.preferred_blas_library("cublaslt" if sms else self.saved[1])


# ----------------------------------------------------------------------------- the weaver


class Weaver:
    """Runs a model's stages with its comm points, splitting large steps in two and overlapping
    one half's communication with the other half's computation.

    mode: auto (split at or above the tuned threshold) | on (split every step of 2+ tokens) | off.
    The caller lays a step out where it asks to split it (split_at), so that each half's attention
    metadata is on the device with the rest of the step.
    """

    def __init__(self, model, comm: Comm, mode: str = "auto", tuning: Tuning | None = None):
        if mode not in ("auto", "on", "off"):
            raise UserError(f"weave mode must be auto, on or off, not {mode!r}")
        self.model, self.comm, self.mode = model, comm, mode
        self.tuning = tuning or Tuning()
        self.threshold = model.weave_threshold if self.tuning.threshold is None else self.tuning.threshold
        self.streams = Streams(comm.d.device)
        self.n_sms = torch.cuda.get_device_properties(comm.d.device).multi_processor_count if self.streams.cuda else 132
        self.stages = model.stages()
        self.kinds = [kind for kind, _, _ in self.stages]

    def split_at(self, T: int):
        """Where half B of a step of T tokens starts, or None: the step runs whole. auto never splits
        a single rank: with no communication to hide, two halves only cost (half-size GEMMs, twice
        the launches)."""
        if self.mode == "off" or T < 2 or (self.mode == "auto" and (T < self.threshold or self.comm.d.world == 1)):
            return None
        return self.tuning.split_at(T, self.model.gemm_widths, self.n_sms)

    def batch(self, spans: list, tokens: list, seq_ids: list | None = None) -> Batch:
        """A step on this rank's device, laid out where this Weaver splits it."""
        return Batch.make(spans, tokens, self.comm.d.device, seq_ids, self.split_at(sum(s.n for s in spans)))

    def __call__(self, batch: Batch) -> torch.Tensor:
        """Logits (B, V) of the last token of each sequence that ends in this batch."""
        halves = list(batch.halves or [batch])
        plans = plan(self.kinds, len(halves), self.tuning, batch.T, self.comm.d.world)
        n = [padded(half.T, self.comm.d.world) for half in halves]
        bufs = [self.comm.buffer(i, n[i]) for i in range(len(halves))]
        for half, buf in zip(halves, bufs):
            buf[half.T:].zero_()          # padding rows stay zero through every stage: inert
        residuals = [self.comm.new_residual(m) for m in n]
        done = [None] * len(halves)
        xs = [buf[:half.T] for half, buf in zip(halves, bufs)]
        if len(halves) == 2:
            self.streams.begin()
        try:
            for k, (_, stage, norm) in enumerate(self.stages):
                for i, half in enumerate(halves):
                    self.streams.wait(done[i])                # this half's x is ready
                    self.streams.carve(plans[k][i].carveout)
                    stage(xs[i], half)                        # x -> this rank's partial, in place
                    point = functools.partial(self.comm, i, n[i], residuals[i], norm.weight, norm.eps,
                                              plans[k][i].ctas)
                    if len(halves) == 1:
                        point()                               # nothing to overlap: stay on this stream
                    else:
                        done[i] = self.streams.comm(point, i)
        finally:
            self.streams.carve(0)
        if len(halves) == 2:
            self.streams.join()
        # (B, H) final-normed. last_rows rise, so T of them are all the rows (a decode step): a view
        rows = [buf[:half.T] if half.last_rows.shape[0] == half.T else buf[half.last_rows]
                for half, buf in zip(halves, bufs)]
        x = rows[0] if len(rows) == 1 else torch.cat(rows)
        return self.comm.gather_vocab(self.model.lm_head(x))[:, :self.model.cfg.vocab]
