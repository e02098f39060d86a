"""The comm point: one op between two compute stages, and the backends that implement it.

A compute stage leaves this rank's *partial* sum p in a step buffer h (T, H). The comm point turns
it back into the next stage's input, in place:

    residual += sum over ranks of p;  h = rmsnorm(residual) * w          (allreduce_add_rmsnorm)

The fused backend does that in one kernel over torch symmetric memory (multimem_ops.cu): a
reduce-scatter, the add + RMSNorm on the 1/N of the rows this rank owns, and an all-gather of the
normalized rows. So the residual is partitioned: rank r keeps rows [r*n/N, (r+1)*n/N) only.
"""
import torch
import torch.distributed as dist

import build_ext
from group import Dist, UserError

# ----------------------------------------------------------------------------- the reference op


def padded(n: int, world: int) -> int:
    """Rows of a step buffer: a multiple of the world size, so every rank owns as many rows."""
    return -(-n // world) * world


def add_rmsnorm_(h: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float, s=None) -> None:
    """residual += s (default h); h = rmsnorm(residual) * w, in place. transformers' numerics:
    the sum rounded to the model dtype, normalized in fp32, cast, then multiplied by the weight."""
    residual.copy_(residual.float() + (h if s is None else s).float())
    r = residual.float()
    h.copy_(w * (r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype))


# ----------------------------------------------------------------------------- the backends


class Comm:
    """What every backend shares: the step buffers a comm point works in, the residual, and the
    gather of vocab-parallel logits. Two buffers, one per half of a split, so that the two halves
    never share memory while their work overlaps. The buffers are allocated once, for the largest
    step: a captured CUDA graph keeps using the same addresses. A backend is called as
    comm(half, n, residual, w, eps, ctas): the comm point over the first n rows of buffer `half`."""
    name = ""
    partitioned = False    # residual holds only this rank's 1/N of the rows

    def __init__(self, d: Dist, hidden: int, max_tokens: int, dtype: torch.dtype):
        self.d, self.hidden, self.dtype = d, hidden, dtype
        self.max_tokens = padded(max_tokens, d.world)
        fits = dtype == torch.bfloat16 and hidden % 8 == 0
        self.ext = build_ext.try_load("comm", d.device, d.rank) if fits else None   # multimem_ops.cu
        self.bufs = self.allocate((2, self.max_tokens, hidden))

    def allocate(self, shape):
        return torch.zeros(shape, dtype=self.dtype, device=self.d.device)

    def buffer(self, half: int, n: int) -> torch.Tensor:
        if n > self.max_tokens:
            raise UserError(f"a step of {n} tokens exceeds the comm buffers, sized for {self.max_tokens} tokens "
                            f"(the step token budget)")
        return self.bufs[half, :n]

    def new_residual(self, n: int) -> torch.Tensor:
        rows = n // self.d.world if self.partitioned else n
        return torch.zeros(rows, self.hidden, dtype=self.dtype, device=self.d.device)

    def __call__(self, half: int, n: int, residual, w, eps: float, ctas: int) -> None:
        raise NotImplementedError

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


class LocalComm(Comm):
    """World size 1: no communication, the plain fused add + RMSNorm."""
    name = "local"

    def __call__(self, half, n, residual, w, eps, ctas):
        self.add_rmsnorm_(self.bufs[half, :n], residual, w, eps)


class NoComm(LocalComm):
    """Communication removed (benchmarks only): each rank's partial taken as the sum. What
    TokenWeave is measured against; its text is not the model's."""
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
    from all peers and writes the normalized rows into every peer's buffer (multimem_ops.cu).

    Replay-safe: the kernel's barriers keep no state on the host (each signal is consumed by
    exactly one wait, see the .cu header), and the buffers and flags never move, so a captured
    CUDA graph may replay the call any number of times."""
    name = "fused"
    partitioned = True
    timeout_s = 30.0

    def __init__(self, d, hidden, max_tokens, dtype):
        if why := fused_unfit(dtype, hidden):
            raise UserError(f"comm fused: {why}; use nccl")
        self._handles = []                     # (tensor, symmetric-memory handle) pairs, kept alive
        super().__init__(d, hidden, max_tokens, dtype)
        if self.ext is None:
            raise RuntimeError("the fused comm needs the CUDA extension, which could not be built here")
        flags = self.allocate((self.ext.limits["max_ctas"] * d.world,), torch.int32)
        self.peer_bufs = [self.peers(self.bufs, half) for half in range(2)]
        self.peer_flags = self.peers(flags, None)
        base = self._handles[0][1].multicast_ptr
        self.multicast = [base and base + self.bufs[half].data_ptr() - self.bufs.data_ptr() for half in range(2)]
        self.transport = "multimem" if self.multicast[0] else "p2p"
        torch.cuda.synchronize()
        dist.barrier()

    def allocate(self, shape, dtype=None):
        import torch.distributed._symmetric_memory as symm_mem
        if torch.torch_version.TorchVersion(torch.__version__) < "2.11":
            symm_mem.enable_symm_mem_for_group(self.d.group_name)   # implicit from 2.11 on
        t = symm_mem.empty(shape, dtype=dtype or self.dtype, device=self.d.device).zero_()
        self._handles.append((t, symm_mem.rendezvous(t, self.d.group_name)))
        return t

    def peers(self, t, half):
        """Address of t (or t[half]) in every rank's mapping of its symmetric allocation."""
        handle = next(h for buf, h in self._handles if buf is t)
        view = t if half is None else t[half]
        return [base + view.data_ptr() - handle.buffer_ptrs[handle.rank] for base in handle.buffer_ptrs]

    def __call__(self, half, n, residual, w, eps, ctas):
        self.ext.fused_allreduce_add_rmsnorm(self.bufs[half, :n], self.peer_bufs[half], self.multicast[half],
                                             self.peer_flags, self.d.rank, residual, w, eps, ctas, self.timeout_s)


class VirtualRanks:
    """N ranks of the fused kernel on one GPU, for testing its protocol (the entry and exit barriers,
    the reduce-scatter and all-gather phases, CUDA-graph replay, timeouts) and timing its fixed cost
    without NVLink. Rank r's "symmetric" buffer bufs[r] and flags are plain allocations on the one
    device; each rank's launch goes on its own stream with its own rank and every rank's addresses,
    as FusedComm passes them. The ranks spin on each other's
    flags, so all launches must be resident at once: N x CTAs must not exceed resident_ctas()."""

    def __init__(self, n: int, hidden: int, max_tokens: int, device, timeout_s: float = 30.0):
        self.ext, self.n, self.timeout_s = build_ext.load("comm"), n, timeout_s
        self.bufs = torch.zeros(n, padded(max_tokens, n), hidden, dtype=torch.bfloat16, device=device)   # bufs[r]: rank r's
        self.flags = torch.zeros(n, self.ext.limits["max_ctas"] * n, dtype=torch.int32, device=device)
        self.streams = [torch.cuda.Stream(device) for _ in range(n)]

    def resident_ctas(self) -> int:
        """CTAs of the kernel for this hidden size that the GPU holds at once."""
        return self.ext.resident_ctas(self.bufs.shape[-1], self.n)

    def __call__(self, rows: int, residuals, w, eps: float, ctas: int, ranks=None):
        """One comm point over bufs[:, :rows] on every rank in `ranks` (default all): rank r holds its
        partial in bufs[r, :rows] and its slice of the residual in residuals[r] (rows/N, H)."""
        peers, flags = [b.data_ptr() for b in self.bufs], [f.data_ptr() for f in self.flags]
        here, ranks = torch.cuda.current_stream(), range(self.n) if ranks is None else ranks
        for r in ranks:       # every launch forks from here before any joins: they must run together
            self.streams[r].wait_stream(here)
            with torch.cuda.stream(self.streams[r]):
                self.ext.fused_allreduce_add_rmsnorm(self.bufs[r, :rows], peers, 0, flags, r, residuals[r], w, eps,
                                                     ctas, self.timeout_s)
        for r in ranks:
            here.wait_stream(self.streams[r])


BACKENDS = {c.name: c for c in (NcclComm, GlooComm, FusedComm, NoComm, LocalComm)}
CHOICES = ["auto", "fused", "nccl", "gloo", "none"]    # what a user may ask for: local is world size 1's


def check_comm(name: str, d: Dist, dtype=torch.bfloat16, hidden: int = 8) -> str:
    """The backend `name` resolves to for this process and a model of this dtype and hidden size
    (auto: fused on Hopper with NVLink P2P and a bf16 model, else nccl on CUDA, gloo on CPU; world
    size 1: local). Raises UserError when it cannot run here: called before the checkpoint loads, so
    a wrong choice fails in seconds, not after minutes of loading."""
    if name not in CHOICES:
        raise UserError(f"unknown comm backend {name!r}; choose from {', '.join(CHOICES)}")
    if d.world == 1:
        if name in ("nccl", "fused", "gloo"):
            raise UserError(f"comm {name} needs 2 or more ranks (start with torchrun --nproc-per-node N); "
                            f"a single process has no communication (use auto)")
        return "none" if name == "none" else "local"
    if name in ("nccl", "fused") and d.device.type != "cuda":
        raise UserError(f"comm {name} needs CUDA GPUs; on the CPU use gloo (or auto)")
    if name == "gloo" and d.device.type != "cpu":
        raise UserError("comm gloo is the CPU reference; on GPUs use fused or nccl (or auto)")
    if name in ("auto", "fused"):
        ok, why = fused_available(d)
        why = why if not ok else fused_unfit(dtype, hidden)
        if name == "auto":
            return "gloo" if d.device.type == "cpu" else "nccl" if why else "fused"
        if why:
            raise UserError(f"comm fused is not available here: {why}; use nccl")
    return name


def make_comm(name: str, d: Dist, hidden: int, max_tokens: int, dtype) -> Comm:
    """The comm point backend `name` (see check_comm), with buffers for steps of max_tokens."""
    name = check_comm(name, d, dtype, hidden)
    return BACKENDS[name](d, hidden, max_tokens, dtype)


def fused_unfit(dtype, hidden: int) -> str:
    """Why the fused kernel cannot run a model of this dtype and hidden size ('' if it can)."""
    if dtype != torch.bfloat16:
        return f"the fused kernel runs bf16 models, this one is {str(dtype).replace('torch.', '')}"
    return f"the fused kernel needs hidden % 8 == 0, this model has {hidden}" if hidden % 8 else ""


def fused_available(d: Dist):
    """(whether the fused kernel can run between these ranks, why not)."""
    if d.device.type != "cuda":
        return False, "no CUDA device"
    if torch.cuda.get_device_capability(d.device)[0] != 9:
        return False, f"{torch.cuda.get_device_name(d.device)} is not a Hopper GPU (sm_90)"
    ok, why = build_ext.available()
    if not ok:
        return False, why
    if d.local_world != d.world:
        return False, "the fused kernel needs all ranks on one NVLink host"
    base = d.device.index - d.local_rank
    peers = [base + i for i in range(d.local_world) if i != d.local_rank]
    if not all(torch.cuda.can_device_access_peer(d.device.index, p) for p in peers):
        return False, "no NVLink/P2P access between the GPUs"
    return True, ""

