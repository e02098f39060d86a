"""The TokenWeave technique: distributed setup, the comm point behind one op, the wave-aware token
split, and the two-stream schedule that overlaps one half's communication with the other half's
computation.

A model is a list of compute stages (embed, attn_0, mlp_0, ..., mlp_{L-1}). Each stage works in
place on a step buffer `h (T, H)`: it reads the normalized input x and overwrites it with this
rank's *partial* sum p. A comm point then turns the buffer back into the next stage's x:

    residual += sum over ranks of p;  x = rmsnorm(residual) * w          (allreduce_add_rmsnorm)

The fused backend does that in one kernel over torch symmetric memory (multimem_ops.cu): a
reduce-scatter, the add + RMSNorm on the 1/N of the rows this rank owns, and an all-gather of the
normalized rows. So the residual is partitioned: rank r keeps rows [r*n/N, (r+1)*n/N) only.
"""
import contextlib
import dataclasses
import json
import math
import os
import warnings

import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------- distributed setup


@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def group_name(self) -> str:
        return dist.group.WORLD.group_name


def init_distributed(device: str = "auto") -> Dist:
    """From torchrun's variables (plain `python` is world size 1): NCCL on CUDA, gloo on CPU."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if torch.cuda.device_count() < local_rank + 1:
            raise SystemExit(f"error: rank {rank} needs GPU {local_rank} but only "
                             f"{torch.cuda.device_count()} are visible; use fewer processes or --device cpu")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    return Dist(rank, world, dev)


def broadcast_from_rank0(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Rank 0's t on every rank (sampled tokens: every rank must continue with the same ones)."""
    t = t.contiguous()
    if d.world > 1:
        dist.broadcast(t, src=0)
    return t


# ----------------------------------------------------------------------------- a step's tokens


@dataclasses.dataclass
class Batch:
    """One step's tokens, flat: the tokens of several sequences back to back, no padding between.

    seqs holds (KV-cache slot, position of the first token, number of tokens) per sequence, in
    token order; the per-token tensors live on the device.
    """
    tokens: torch.Tensor     # (T,) token ids
    positions: torch.Tensor  # (T,) position of each token in its sequence
    slots: torch.Tensor      # (T,) KV-cache slot of each token's sequence
    seqs: list              # [(slot, start, n)]

    @classmethod
    def make(cls, seqs, token_ids, device) -> "Batch":
        """seqs: [(slot, start, n)]; token_ids: the T = sum(n) token ids in the same order."""
        positions = [s + i for _, s, n in seqs for i in range(n)]
        slots = [slot for slot, _, n in seqs for _ in range(n)]
        assert len(token_ids) == len(positions)
        as_t = lambda v: torch.tensor(v, dtype=torch.long, device=device)
        return cls(as_t(list(token_ids)), as_t(positions), as_t(slots), list(seqs))

    @property
    def T(self) -> int:
        return self.tokens.shape[0]

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for _, _, n in self.seqs)

    @property
    def last_rows(self) -> list:
        """Row of each sequence's last token: where its next-token logits come from."""
        ends, total = [], 0
        for _, _, n in self.seqs:
            total += n
            ends.append(total - 1)
        return ends

    def split(self, S: int):
        """Tokens [0, S) and [S, T). A sequence that straddles S becomes two parts; its first part
        writes its KV before the second part's attention reads it (same layer, same stream)."""
        assert 0 < S < self.T
        a, b, off = [], [], 0
        for slot, start, n in self.seqs:
            k = min(max(S - off, 0), n)      # how many of this sequence's tokens fall before S
            if k:
                a.append((slot, start, k))
            if n - k:
                b.append((slot, start + k, n - k))
            off += n
        part = lambda lo, hi, seqs: Batch(self.tokens[lo:hi], self.positions[lo:hi], self.slots[lo:hi], seqs)
        return part(0, S, a), part(S, self.T, b)


# ----------------------------------------------------------------------------- the wave-aware split

GEMM_TILE_M, GEMM_TILE_N = 128, 256   # a typical Hopper cuBLAS tile: tokens x output features


def gemm_waves(m: int, n: int, n_sms: int) -> int:
    return math.ceil(math.ceil(m / GEMM_TILE_M) * math.ceil(n / GEMM_TILE_N) / n_sms)


def wave_split(T: int, gemm_widths, n_sms: int = 132) -> int:
    """Half of T, moved by up to two tiles so that both halves' GEMMs fill whole waves.

    The cost model counts waves of (128 x 256)-tiles over the SMs for every GEMM of a layer
    (its local output width in gemm_widths); ties go to the most even split.
    """
    if T < 2 * GEMM_TILE_M:
        return T // 2
    half = round(T / 2 / GEMM_TILE_M) * GEMM_TILE_M
    cost = lambda S: sum(gemm_waves(S, n, n_sms) + gemm_waves(T - S, n, n_sms) for n in gemm_widths)
    candidates = [half + k * GEMM_TILE_M for k in (0, -1, 1, -2, 2) if 0 < half + k * GEMM_TILE_M < T]
    return min(candidates, key=cost)   # min keeps the first of equals: the most even one


@dataclasses.dataclass
class Tuning:
    """When to split and how many CTAs each comm point gets; from configs/<gpu>-<model>-tp<N>.json
    (written by `bench.py tune`), keyed by token count (nearest key wins)."""
    threshold: int = 1024            # no split below this many tokens: fuse-only
    fuse_ctas: int = 16              # comm CTAs when nothing overlaps (fuse-only, decode)
    attn_ctas: int = 4               # comm CTAs while the other half runs attention
    mlp_ctas: int = 4                # ... while it runs the MLP
    carveout: bool = True            # overlapped GEMMs leave the comm's CTAs their SMs (see Streams)
    table: dict = dataclasses.field(default_factory=dict)   # tokens -> {offset, attn_ctas, mlp_ctas, carveout}

    @classmethod
    def load(cls, path: str | None) -> "Tuning":
        if not path or not os.path.exists(path):
            return cls()
        with open(path) as f:
            raw = json.load(f)
        table = {int(k): v for k, v in raw.pop("table", {}).items()}
        return cls(**{k: v for k, v in raw.items() if k in {f.name for f in dataclasses.fields(cls)}}, table=table)

    def entry(self, T: int) -> dict:
        if not self.table:
            return {}
        return self.table[min(self.table, key=lambda k: abs(math.log2(k / T)))]

    def split(self, T: int, gemm_widths, n_sms: int) -> int:
        e = self.entry(T)
        if "offset" in e:
            S = round(T / 2 / 256) * 256 + e["offset"]
            if 0 < S < T:
                return S
        return wave_split(T, gemm_widths, n_sms)

    def carves(self, T: int) -> bool:
        """carveout is the master switch; the table may turn it off per token count."""
        return self.carveout and self.entry(T).get("carveout", True)

    def ctas(self, T: int, kind: str) -> int:
        e = self.entry(T)
        return e.get(f"{kind}_ctas", getattr(self, f"{kind}_ctas"))


def tuning_path(cfg, world: int) -> str:
    """configs/<gpu>-<model type>-h<hidden>-tp<N>.json: keyed by shape, so a real checkpoint finds
    the table that `bench.py tune` wrote for its preset."""
    gpu = torch.cuda.get_device_name().split()[-1].lower() if torch.cuda.is_available() else "cpu"
    name = f"{gpu}-{cfg.model_type}-h{cfg.hidden}-tp{world}.json"
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", name)


# ----------------------------------------------------------------------------- comm backends


def add_rmsnorm_(h: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float, s=None) -> None:
    """residual += s (default h); h = rmsnorm(residual) * w, in place. transformers' numerics:
    the sum rounded to the model dtype, normalized in fp32, cast, then multiplied by the weight."""
    residual.copy_(residual.float() + (h if s is None else s).float())
    r = residual.float()
    h.copy_(w * (r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype))


class Comm:
    """One comm point as an in-place op on a step buffer. Two buffers, one per half of a split,
    so that the two halves never share memory while their work overlaps."""
    name = "local"
    partitioned = False    # residual holds only this rank's 1/N of the rows

    def __init__(self, d: Dist, hidden: int, max_tokens: int, dtype: torch.dtype):
        self.d, self.hidden, self.dtype = d, hidden, dtype
        self.max_tokens = padded(max_tokens, d.world)
        self.ext = load_ext(d) if dtype == torch.bfloat16 and hidden % 8 == 0 else None
        self.bufs = self.allocate((2, self.max_tokens, hidden))

    def allocate(self, shape):
        return torch.zeros(shape, dtype=self.dtype, device=self.d.device)

    def buffer(self, half: int, n: int) -> torch.Tensor:
        if n > self.max_tokens:
            raise ValueError(f"a step of {n} tokens exceeds the comm buffers ({self.max_tokens} tokens); "
                             f"raise --max-batch-tokens (or max_tokens) to at least {n}")
        return self.bufs[half, :n]

    def new_residual(self, n: int) -> torch.Tensor:
        rows = n // self.d.world if self.partitioned else n
        return torch.zeros(rows, self.hidden, dtype=self.dtype, device=self.d.device)

    def __call__(self, half: int, n: int, residual, w, eps: float, ctas: int) -> None:
        self.add_rmsnorm_(self.bufs[half, :n], residual, w, eps)

    def add_rmsnorm_(self, h, residual, w, eps):
        """The local add + RMSNorm: the fused kernel on CUDA (one pass over h and the residual),
        the torch reference elsewhere."""
        if self.ext is not None:
            self.ext.fused_add_rmsnorm(h, residual, w, eps)
        else:
            add_rmsnorm_(h, residual, w, eps)

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V/N) vocab-parallel logits -> (B, V) on every rank."""
        if self.d.world == 1:
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.d.world)]
        dist.all_gather(parts, logits.contiguous())
        return torch.cat(parts, dim=-1)


class NoComm(Comm):
    """Communication removed (benchmarks only): what TokenWeave is measured against."""
    name = "none"

    def gather_vocab(self, logits):
        return logits.repeat(1, self.d.world)


class NcclComm(Comm):
    """The baseline (vLLM's default): all-reduce, then add + RMSNorm over all rows on every rank."""
    name = "nccl"

    def __call__(self, half, n, residual, w, eps, ctas):
        h = self.bufs[half, :n]
        dist.all_reduce(h)
        self.add_rmsnorm_(h, residual, w, eps)


class GlooComm(Comm):
    """The executable specification of the fused op, with plain collectives: reduce (in fp32, so
    every rank gets the same bits), add + RMSNorm on this rank's 1/N of the rows, all-gather."""
    name = "gloo"
    partitioned = True

    def __call__(self, half, n, residual, w, eps, ctas):
        h, m, r = self.bufs[half, :n], n // self.d.world, self.d.rank
        s = h.float()
        dist.all_reduce(s)                     # gloo has no reduce-scatter; keep our rows only
        mine = h[r * m:(r + 1) * m].clone()    # (n/N, H) the rows this rank owns
        add_rmsnorm_(mine, residual, w, eps, s=s[r * m:(r + 1) * m])
        dist.all_gather(list(h.chunk(self.d.world)), mine)


class FusedComm(Comm):
    """The fused kernel over torch symmetric memory: every rank reads the partials of its own rows
    from all peers and writes the normalized rows into every peer's buffer (multimem_ops.cu)."""
    name = "fused"
    partitioned = True
    timeout_s = 30.0

    def __init__(self, d, hidden, max_tokens, dtype):
        if dtype != torch.bfloat16 or hidden % 8:
            raise ValueError(f"--comm fused needs bf16 and hidden % 8 == 0 (got {dtype}, hidden {hidden})")
        self._handles = []                     # (tensor, symmetric-memory handle) pairs, kept alive
        super().__init__(d, hidden, max_tokens, dtype)
        if self.ext is None:
            raise SystemExit("error: --comm fused: the CUDA extension could not be built here")
        flags = self.allocate((self.ext.max_ctas() * d.world,), torch.int32)
        self.peer_bufs = [self.peers(self.bufs, half) for half in range(2)]
        self.peer_flags = self.peers(flags, None)
        self.multicast = [self.bufs_handle.multicast_ptr and self.bufs_handle.multicast_ptr +
                          self.bufs[half].data_ptr() - self.bufs.data_ptr() for half in range(2)]
        self.transport = "multimem" if self.multicast[0] else "p2p"
        # This class builds the buffer, peer and flag arguments; the Weaver the residual slices. So the
        # per-call Python checks (~5 us each, 160 calls per decode step at 80 layers) are skipped.
        self.allreduce = self.ext.fused_allreduce_add_rmsnorm.unchecked
        torch.cuda.synchronize()
        dist.barrier()

    def allocate(self, shape, dtype=None):
        import torch.distributed._symmetric_memory as symm_mem
        if torch.torch_version.TorchVersion(torch.__version__) < "2.11":
            symm_mem.enable_symm_mem_for_group(self.d.group_name)   # implicit from 2.11 on
        t = symm_mem.empty(shape, dtype=dtype or self.dtype, device=self.d.device).zero_()
        handle = symm_mem.rendezvous(t, self.d.group_name)
        self._handles.append((t, handle))
        if dtype is None:
            self.bufs_handle = handle
        return t

    def peers(self, t, half):
        """Address of t (or t[half]) in every rank's mapping of its symmetric allocation."""
        handle = next(h for buf, h in self._handles if buf is t)
        view = t if half is None else t[half]
        return [base + view.data_ptr() - handle.buffer_ptrs[handle.rank] for base in handle.buffer_ptrs]

    def __call__(self, half, n, residual, w, eps, ctas):
        self.allreduce(self.bufs[half, :n], self.peer_bufs[half], self.multicast[half],
                       self.peer_flags, self.d.rank, residual, w, eps, ctas, self.timeout_s)


class LocalComm(Comm):
    """World size 1: no communication, the plain fused add + RMSNorm."""


def load_ext(d: Dist):
    """The compiled kernels where they can be built (Hopper + nvcc), else None: torch fallbacks."""
    if d.device.type != "cuda":
        return None
    import build_ext
    if not build_ext.available()[0]:
        return None
    try:
        return build_ext.load()
    except build_ext.BuildError as e:
        if d.rank == 0:
            print(f"warning: {e}; using torch ops for add + RMSNorm", flush=True)
        return None


def padded(n: int, world: int) -> int:
    return -(-n // world) * world


def make_comm(name: str, d: Dist, hidden: int, max_tokens: int, dtype) -> Comm:
    """name: auto | fused | nccl | gloo | none. auto: fused on Hopper with NVLink P2P, else nccl (CUDA)
    or gloo (CPU)."""
    if d.world == 1 and name != "none":
        return LocalComm(d, hidden, max_tokens, dtype)
    if name == "auto":
        name = "gloo" if d.device.type == "cpu" else ("fused" if fused_available(d)[0] else "nccl")
    if name == "fused" and not fused_available(d)[0]:
        raise SystemExit(f"error: --comm fused is not available here: {fused_available(d)[1]}")
    if name in ("nccl", "fused") and d.device.type != "cuda":
        raise SystemExit(f"error: --comm {name} needs CUDA; use --comm gloo on CPU")
    backends = {c.name: c for c in (NcclComm, GlooComm, FusedComm, NoComm)}
    if name not in backends:
        raise SystemExit(f"error: unknown --comm {name!r}; choose from auto, {', '.join(backends)}")
    return backends[name](d, hidden, max_tokens, dtype)


def fused_available(d: Dist):
    if d.device.type != "cuda":
        return False, "no CUDA device"
    if torch.cuda.get_device_capability(d.device)[0] != 9:
        return False, f"{torch.cuda.get_device_name(d.device)} is not a Hopper GPU (sm_90)"
    import build_ext
    ok, why = build_ext.available()
    if not ok:
        return False, why
    local = int(os.environ.get("LOCAL_WORLD_SIZE", d.world))
    if local != d.world:
        return False, "the fused kernel needs all ranks on one NVLink host"
    base = d.device.index - d.rank % local
    peers = [base + i for i in range(local) if base + i != d.device.index]
    if not all(torch.cuda.can_device_access_peer(d.device.index, p) for p in peers):
        return False, "no NVLink/P2P access between the GPUs"
    return True, ""


# ----------------------------------------------------------------------------- the schedule


class Streams:
    """Compute on the current stream, communication on a high-priority side stream (CUDA); on CPU
    both run inline, so the same schedule runs sequentially."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.side = torch.cuda.Stream(device, priority=-1) if self.cuda else None

    def comm(self, fn):
        """Run fn on the side stream after all compute issued so far; returns its done-event."""
        if not self.cuda:
            fn()
            return None
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            fn()
        return self.side.record_event()

    def wait(self, event):
        if event is not None:
            torch.cuda.current_stream().wait_event(event)

    def join(self):
        if self.cuda:
            torch.cuda.current_stream().wait_stream(self.side)

    @contextlib.contextmanager
    def carveout(self, sms: int):
        """cuBLAS's GEMMs launched inside run on all SMs but `sms`. They are persistent: one CTA
        per SM, each walking a fixed list of tiles. Launched beside a comm kernel that holds some
        SMs, the CTAs that find no SM wait for the comm to finish, and their tiles finish last: the
        trace showed overlapped GEMMs 1.2-1.8x slower. Sized to the comm's CTAs, they all run at
        once. torch reads the setting when it launches a GEMM (cuBLASLt and grouped GEMMs only)."""
        if not self.cuda or not sms:
            yield
            return
        before = torch._C._get_sm_carveout_experimental()
        with warnings.catch_warnings():   # torch warns once that the setting is experimental
            warnings.filterwarnings("ignore", message="Setting the SM carveout")
            torch._C._set_sm_carveout_experimental(sms)
        try:
            yield
        finally:
            torch._C._set_sm_carveout_experimental(before)


class Weaver:
    """Runs a model's stages with its comm points, splitting large steps in two and overlapping
    one half's communication with the other half's computation.

    mode: auto (split at or above the tuned threshold) | on (split every step of 2+ tokens) | off.
    """

    def __init__(self, model, comm: Comm, mode: str = "auto", tuning: Tuning | None = None):
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"weave mode must be auto, on or off, not {mode!r}")
        self.model, self.comm, self.mode = model, comm, mode
        self.tuning = tuning or Tuning(threshold=getattr(model, "weave_threshold", 1024))
        self.streams = Streams(comm.d.device)
        self.n_sms = torch.cuda.get_device_properties(comm.d.device).multi_processor_count if self.streams.cuda else 132
        if self.streams.cuda:
            # torch's SM carveout reaches cuBLASLt's GEMMs, not cuBLAS's: so every GEMM goes to cuBLASLt,
            # in every mode alike (its kernel choices differ a little from cuBLAS's).
            torch.backends.cuda.preferred_blas_library("cublaslt")

    def split_point(self, T: int):
        if self.mode == "off" or T < 2 or (self.mode == "auto" and T < self.tuning.threshold):
            return None
        return self.tuning.split(T, self.model.gemm_widths, self.n_sms)

    def __call__(self, batch: Batch, split: int | None = None) -> torch.Tensor:
        """Logits (B, V) of each sequence's last token; split overrides the planned split point."""
        S = self.split_point(batch.T) if split is None else split
        halves = [batch] if not S else list(batch.split(S))
        world = self.comm.d.world
        n = [padded(half.T, world) for half in halves]
        bufs = [self.comm.buffer(i, n[i]) for i in range(len(halves))]
        for half, buf in zip(halves, bufs):
            buf[half.T:].zero_()          # padding rows stay zero through every stage: inert
        residuals = [self.comm.new_residual(m) for m in n]
        stages = self.model.stages()
        kinds = [kind if kind != "embed" else "attn" for kind, _, _ in stages] + ["attn"]
        done = [None] * len(halves)
        budget = {kind: self.tuning.ctas(batch.T, kind) for kind in set(kinds)}   # comm CTAs by overlapped kind
        carve = len(halves) == 2 and self.tuning.carves(batch.T)
        for k, (_, stage, norm) in enumerate(stages):
            for i, half in enumerate(halves):
                self.streams.wait(done[i])            # x of this half is ready
                # Split: A's comm overlaps B's stage k, B's comm overlaps A's stage k+1; so both
                # halves' stage k run beside a comm with the CTA budget of kind k.
                with self.streams.carveout(budget[kinds[k]] if carve and (k or i) else 0):
                    stage(bufs[i][:half.T], half)     # x -> this rank's partial, in place
                ctas = self.tuning.fuse_ctas if len(halves) == 1 else budget[kinds[k + i]]
                done[i] = self.streams.comm(
                    lambda i=i, ctas=ctas: self.comm(i, n[i], residuals[i], norm.weight, norm.eps, ctas))
        self.streams.join()
        last = batch.last_rows
        x = torch.cat([bufs[i][[r - lo for r in last if lo <= r < lo + half.T]]   # (B, H) final-normed
                       for i, (half, lo) in enumerate(zip(halves, (0, S or 0)))])
        return self.comm.gather_vocab(self.model.lm_head(x))[:, :self.model.cfg.vocab]
