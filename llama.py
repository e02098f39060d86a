"""Llama 3 for tensor-parallel inference, as a list of compute stages (see weave.py).

Every layer is built already sharded: rank r of N holds 1/N of the heads and of the MLP's
intermediate features, and reads only its slice of each checkpoint tensor (models.py loads them).
This is the plain reference model, torch ops only; on one Hopper GPU the engine swaps in the fast
path's kernels (fastpath.py), which give the same tokens.
Shapes in comments: T tokens of the step, H hidden, nh/nkv heads of this rank (local), hd head
dim, I/N local MLP.
"""
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from batch import Batch
from group import Dist, UserError

# ----------------------------------------------------------------------------- config


@dataclasses.dataclass
class Config:
    model_type: str = "llama"
    hidden: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    intermediate: int = 14336
    vocab: int = 128256
    eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None
    tie_embeddings: bool = False
    max_positions: int = 131072
    eos_ids: tuple = ()
    dtype: str = "bfloat16"
    qkv_bias: bool = False

    @classmethod
    def from_hf(cls, c: dict) -> "Config":
        """From a checkpoint's config.json: the hub form (rope_theta, rope_scaling, torch_dtype) or
        the one transformers 5 writes (rope_parameters, dtype). Raises UserError naming the key
        that is missing or of the wrong type (models.config puts the file's name in front)."""
        for key in ("attention_bias", "mlp_bias"):
            if c.get(key):
                raise UserError(f"sets {key}: true, which this Llama does not support")
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", c.get("rope_theta", 10000.0))
        if rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = None
        eos = c.get("eos_token_id")
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        hidden, layers, heads = (need(c, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads"))
        return cls(
            model_type=c["model_type"], hidden=hidden, n_layers=layers, n_heads=heads,
            n_kv_heads=need(c, "num_key_value_heads", heads), head_dim=need(c, "head_dim", hidden // heads, none=True),
            intermediate=need(c, "intermediate_size"), vocab=need(c, "vocab_size"),
            eps=need(c, "rms_norm_eps", 1e-6, float), rope_theta=need({"rope_theta": theta}, "rope_theta", kind=float),
            rope_scaling=rope, tie_embeddings=need(c, "tie_word_embeddings", False, bool),
            max_positions=need(c, "max_position_embeddings", 4096),
            eos_ids=tuple(need({"eos_token_id": e}, "eos_token_id", low=0) for e in eos),
            dtype=str(c.get("dtype") or c.get("torch_dtype") or "bfloat16"))


_MISSING = object()


def need(c: dict, key: str, default=_MISSING, kind=int, low=1, none=False):
    """c[key] (or the default), checked: an int >= low, a positive number, or a bool."""
    v = c.get(key, default) if not (none and c.get(key) is None) else default
    if v is _MISSING:
        raise UserError(f"has no {key!r}: it is not a complete {c.get('model_type')} config")
    if kind is bool:
        ok, what = isinstance(v, bool), "true or false"
    elif kind is float:
        ok, what = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "a positive number"
    else:
        ok, what = isinstance(v, int) and not isinstance(v, bool) and v >= low, f"an integer of at least {low}"
    if not ok:
        raise UserError(f"sets {key!r} to {v!r}: it must be {what}")
    return v


# ----------------------------------------------------------------------------- sharded layers


def shard(n: int, d: Dist, what: str) -> int:
    if n % d.world:
        raise UserError(f"tensor parallel size {d.world} does not divide {what} ({n}); "
                        f"use a TP size that divides it")
    return n // d.world


class ColumnParallel(nn.Module):
    """y = x W^T + b, W's output features split across ranks. Several checkpoint tensors (q, k, v;
    gate, up) can be stacked into one GEMM: each part is sharded on its own."""

    def __init__(self, d: Dist, in_features: int, parts: list, bias: bool = False, what: str = "features"):
        super().__init__()
        self.d, self.parts = d, [shard(p, d, what) for p in parts]
        self.weight = nn.Parameter(torch.empty(sum(self.parts), in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(sum(self.parts)), requires_grad=False) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def loader(self, i: int, param: str = "weight"):
        """Loads checkpoint part i: this rank's rows of it."""
        lo, n = sum(self.parts[:i]), self.parts[i]
        dest = getattr(self, param)[lo:lo + n]
        return Shard(dest, (n * self.d.world, *dest.shape[1:]), rows=slice(self.d.rank * n, (self.d.rank + 1) * n))


class RowParallel(nn.Module):
    """This rank's partial of y = x W^T, W's input features split across ranks; the sum over
    ranks happens at the comm point. Writes straight into `out` (the comm buffer): no copy."""

    def __init__(self, d: Dist, in_features: int, out_features: int, what: str = "features"):
        super().__init__()
        self.d, self.n = d, shard(in_features, d, what)
        self.weight = nn.Parameter(torch.empty(out_features, self.n), requires_grad=False)

    def forward(self, x, out):
        torch.mm(x, self.weight.t(), out=out)

    def loader(self):
        r, n = self.d.rank, self.n
        return Shard(self.weight, (self.weight.shape[0], n * self.d.world), cols=slice(r * n, (r + 1) * n))


class VocabParallel(nn.Module):
    """Embedding or LM head with the vocabulary split across ranks (the last shard zero-padded)."""

    def __init__(self, d: Dist, vocab: int, hidden: int):
        super().__init__()
        self.d, self.vocab, self.n = d, vocab, -(-vocab // d.world)
        self.start = d.rank * self.n
        self.weight = nn.Parameter(torch.zeros(self.n, hidden), requires_grad=False)

    def embed(self, tokens, out):
        """out (T, H) <- this rank's partial of the embedding: rows of ids it holds, zero elsewhere."""
        if self.d.world == 1:     # every id is this rank's (Engine.check rejects the others): one gather
            torch.index_select(self.weight, 0, tokens, out=out)
            return
        ids = tokens - self.start
        mine = (ids >= 0) & (ids < self.n)
        out.copy_(F.embedding(ids.clamp(0, self.n - 1), self.weight) * mine[:, None])

    def loader(self):
        hi = min(self.start + self.n, self.vocab)
        return Shard(self.weight[:max(hi - self.start, 0)], (self.vocab, self.weight.shape[1]),
                     rows=slice(self.start, hi))


class RMSNorm(nn.Module):
    """Only holds the weight: the norm itself runs inside the comm point (comm.add_rmsnorm_)."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden), requires_grad=False)

    def loader(self):
        return Shard(self.weight, tuple(self.weight.shape))


@dataclasses.dataclass
class Shard:
    """Where one checkpoint tensor goes: rows x cols of it (this rank's slice) into dest. `full` is
    the shape the whole tensor must have in the checkpoint: a config.json that disagrees with its
    tensors is refused, even where this rank's slice would fit (fewer heads, a smaller vocabulary)."""
    dest: torch.Tensor
    full: tuple
    rows: slice | None = None     # None: all
    cols: slice | None = None

    def __call__(self, sl):
        """sl: the tensor in the file (safetensors' lazy slice: only this rank's part is read)."""
        if tuple(sl.get_shape()) != tuple(self.full):
            raise UserError(f"expected shape {tuple(self.full)}, the checkpoint has {tuple(sl.get_shape())}")
        rows = self.rows or slice(None)
        self.dest.copy_(sl[rows] if self.cols is None else sl[rows, self.cols])


# ----------------------------------------------------------------------------- rope


def rope_inv_freq(cfg: Config) -> torch.Tensor:
    """(hd/2,) inverse frequencies; llama3 scaling divides the low frequencies by `factor` and
    interpolates the band between low_freq_factor and high_freq_factor."""
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float) / cfg.head_dim)
    s = cfg.rope_scaling
    if s is None:
        return inv
    kind = s.get("rope_type", s.get("type"))
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    if kind != "llama3":
        raise UserError(f"rope scaling {kind!r} is not supported (only default and llama3)")
    if any(not isinstance(s.get(k), (int, float)) for k in keys):
        raise UserError(f"llama3 rope scaling needs numbers for {', '.join(keys)}; got {s}")
    old = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = ((old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])).clamp(0, 1)
    return (1 - smooth) * inv / s["factor"] + smooth * inv


def rope_table(cfg: Config, max_len: int, dtype, device) -> torch.Tensor:
    """(max_len, 2, hd): cos and sin of every position's angles, computed in fp32 and cast to the
    model's dtype as transformers does; a step gathers its rows once per layer by position."""
    if device.type == "meta":   # shapes only (sizing a model): torch's meta arange imports sympy (seconds)
        return torch.empty(max_len, 2, cfg.head_dim, dtype=dtype, device=device)
    angles = torch.arange(max_len, device=device, dtype=torch.float)[:, None] * rope_inv_freq(cfg).to(device)
    angles = torch.cat((angles, angles), dim=-1)                              # (max_len, hd)
    return torch.stack((angles.cos(), angles.sin()), dim=1).to(dtype)


def apply_rope(x, cos, sin):
    """x (T, heads, hd) in HF's rotate-half layout: pairs are (i, i + hd/2); cos, sin (T, 1, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ----------------------------------------------------------------------------- attention and MLP

class Attention(nn.Module):
    """GQA attention over the KV cache (rows, nkv, hd): a sequence holds one contiguous range of rows,
    position p at row span.row + p (batch.py). A step writes its K/V there first, then attends."""

    def __init__(self, cfg: Config, d: Dist, rope: torch.Tensor):
        super().__init__()
        if cfg.n_kv_heads % d.world:
            raise UserError(f"tensor parallel size {d.world} must divide the {cfg.n_kv_heads} KV heads; "
                            f"use a TP size that divides {cfg.n_kv_heads}")
        self.nh, self.nkv, self.hd = cfg.n_heads // d.world, cfg.n_kv_heads // d.world, cfg.head_dim
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.qkv = ColumnParallel(d, cfg.hidden, [q, kv, kv], bias=cfg.qkv_bias, what="attention heads")
        self.o = RowParallel(d, q, cfg.hidden, what="attention heads")
        self.rope = rope            # (max_positions, 2, hd), shared by all layers
        self.k_cache = self.v_cache = None

    def forward(self, h, batch: Batch):
        """h (T, H): x in, this rank's partial of o_proj out."""
        q = self.qkv_rope(h, batch)                                           # (T, nh, hd)
        o = self.attend(q, batch)                                             # (T, nh, hd)
        self.o(o.reshape(h.shape[0], self.nh * self.hd), out=h)

    def qkv_rope(self, h, batch: Batch):
        """h (T, H) -> q (T, nh, hd) rotated; the step's keys (rotated) and values go into the cache."""
        T, nh, nkv, hd = h.shape[0], self.nh, self.nkv, self.hd
        qkv = self.qkv(h)                                                     # (T, (nh + 2 nkv) hd)
        cos, sin = self.rope[batch.positions].unsqueeze(2).unbind(1)          # (T, 1, hd) each
        qk = apply_rope(qkv[:, :(nh + nkv) * hd].view(T, nh + nkv, hd), cos, sin)   # (T, nh + nkv, hd)
        self.k_cache[batch.kv_rows] = qk[:, nh:]
        self.v_cache[batch.kv_rows] = qkv[:, (nh + nkv) * hd:].view(T, nkv, hd)
        return qk[:, :nh]

    def attend(self, q, batch: Batch):
        """q (T, nh, hd) against the cache, which holds this step's keys and values already. Each
        span's queries see its keys up to their own positions (the causal mask aligned to the span's
        end). On CUDA, FlashAttention's variable-length kernel reads every span's keys in place, in
        two calls at most: the decode tokens (one query each), then the prompt chunks. One call for
        both would run every decode token as a tile of 128 queries, most of them empty. FlashAttention
        runs bf16 and fp16 only: other dtypes, and the CPU, take the reference."""
        if not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16):
            return attend_reference(q, self.k_cache, self.v_cache, batch)
        s, n = batch.n_single, len(batch.spans)
        if s == 0:                                                            # prompt chunks only
            return self.flash(q, batch.cu_q, batch.kv_starts, batch.kv_lens, batch.max_q, batch.max_k)
        o = q.new_empty(q.shape)                                              # (T, nh, hd)
        self.attend_decode(q[:s], batch, out=o[:s])
        if s < n:
            o[s:] = self.flash(q[s:], batch.cu_c, batch.kv_starts[s:], batch.kv_lens[s:], batch.max_q, batch.max_k)
        return o

    def attend_decode(self, q, batch: Batch, out):
        """out (s, nh, hd) <- the step's s decode tokens (its first spans, one query each) against
        their keys."""
        s = q.shape[0]
        out.copy_(self.flash(q, batch.cu_q[:s + 1], batch.kv_starts[:s + 1], batch.kv_lens[:s], 1, batch.max_k))

    def flash(self, q, cu_q, kv_starts, kv_lens, max_q: int, max_k: int):
        """FlashAttention over the cache: span i's queries q[cu_q[i]:cu_q[i + 1]] against kv_lens[i]
        keys from row kv_starts[i], causal and aligned to the span's end. (T, nh, hd)."""
        return torch.ops.aten._flash_attention_forward(q, self.k_cache, self.v_cache, cu_q, kv_starts, max_q, max_k,
                                                       0.0, True, False, seqused_k=kv_lens)[0]

    def loaders(self, p: str) -> dict:
        out = {f"{p}.{n}_proj.weight": self.qkv.loader(i) for i, n in enumerate("qkv")}
        if self.qkv.bias is not None:
            out.update({f"{p}.{n}_proj.bias": self.qkv.loader(i, "bias") for i, n in enumerate("qkv")})
        return out | {f"{p}.o_proj.weight": self.o.loader()}


def attend_reference(q, k_cache, v_cache, batch: Batch):
    """What the attention kernels compute, one span at a time (CPU, and the GPU tests)."""
    o, off = torch.empty_like(q), 0
    for s in batch.spans:
        qs = q[off:off + s.n].transpose(0, 1)[None]                           # (1, nh, n, hd)
        K, V = (c[s.row:s.row + s.start + s.n].transpose(0, 1)[None] for c in (k_cache, v_cache))  # (1, nkv, start + n, hd)
        # A chunk after a prefix: query i sees keys up to start + i (the causal mask aligned to the end).
        # A boolean mask rather than torch.nn.attention.bias, whose import pulls in torch._dynamo (seconds).
        mask = torch.ones(s.n, s.start + s.n, dtype=torch.bool, device=q.device).tril(s.start) if s.start else None
        out = F.scaled_dot_product_attention(qs, K, V, attn_mask=mask, is_causal=not s.start, enable_gqa=True)
        o[off:off + s.n] = out[0].transpose(0, 1)
        off += s.n
    return o


def swiglu(gate_up):
    """(T, 2I) [gate | up] -> (T, I) silu(gate) * up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up in one GEMM."""

    def __init__(self, cfg: Config, d: Dist):
        super().__init__()
        self.gate_up = ColumnParallel(d, cfg.hidden, [cfg.intermediate] * 2, what="MLP features")
        self.down = RowParallel(d, cfg.intermediate, cfg.hidden, what="MLP features")

    def forward(self, h, batch: Batch):
        """h (T, H): x in, this rank's partial of down_proj out."""
        act = self.act(self.gate_up(h))                                       # (T, 2I/N) -> (T, I/N)
        self.down(act, out=h)                                                 # (T, H)

    def act(self, gate_up):
        return swiglu(gate_up)

    def loaders(self, p: str) -> dict:
        return {f"{p}.gate_proj.weight": self.gate_up.loader(0), f"{p}.up_proj.weight": self.gate_up.loader(1),
                f"{p}.down_proj.weight": self.down.loader()}


# ----------------------------------------------------------------------------- the model


class Layer(nn.Module):
    def __init__(self, cfg: Config, d: Dist, mlp_cls, rope):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden, cfg.eps)
        self.attn = Attention(cfg, d, rope)
        self.post_attn_norm = RMSNorm(cfg.hidden, cfg.eps)
        self.mlp = mlp_cls(cfg, d)


class Transformer(nn.Module):
    """Built on the current default device and dtype (models.build sets both)."""
    MLP = MLP              # Mixtral swaps in its MoE block
    weave_threshold = 1024  # tokens below which no split pays (weave.Tuning's default)

    def __init__(self, cfg: Config, d: Dist):
        super().__init__()
        self.cfg, self.d = cfg, d
        rope = rope_table(cfg, cfg.max_positions, torch.get_default_dtype(), d.device)
        self.embed_tokens = VocabParallel(d, cfg.vocab, cfg.hidden)
        self.layers = nn.ModuleList(Layer(cfg, d, self.MLP, rope) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden, cfg.eps)
        self.head = self.embed_tokens if cfg.tie_embeddings else VocabParallel(d, cfg.vocab, cfg.hidden)
        a = self.layers[0].attn
        # Local output widths of one layer's GEMMs, for the wave model of the split.
        self.gemm_widths = [a.qkv.weight.shape[0], cfg.hidden, 2 * cfg.intermediate // d.world, cfg.hidden]

    def embed(self, h, batch: Batch):
        self.embed_tokens.embed(batch.tokens, out=h)

    def stages(self) -> list:
        """The forward: [(kind, stage, norm of the comm point after it)]. A stage works in place on
        the step buffer h (T, H): it reads x and leaves this rank's partial sum."""
        out = [("embed", self.embed, self.layers[0].input_norm)]
        for i, layer in enumerate(self.layers):
            after = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.norm
            out += [("attn", layer.attn, layer.post_attn_norm), ("mlp", layer.mlp, after)]
        return out

    def lm_head(self, x):
        """x (B, H) final-normed -> (B, V/N) this rank's logits."""
        return F.linear(x, self.head.weight)

    def allocate_cache(self, rows: int):
        """A KV cache of `rows` positions in all (sequences hold ranges of it), or none (rows 0)."""
        for layer in self.layers:      # the old cache goes first: two might not fit
            layer.attn.k_cache = layer.attn.v_cache = None
        if not rows:
            return
        a, w = self.layers[0].attn, self.norm.weight
        for layer in self.layers:
            layer.attn.k_cache = torch.zeros(rows, a.nkv, a.hd, dtype=w.dtype, device=w.device)   # (rows, nkv, hd)
            layer.attn.v_cache = torch.zeros_like(layer.attn.k_cache)

    def cache_bytes(self, rows: int) -> int:
        """What allocate_cache(rows) takes on this rank: K and V of every layer."""
        a = self.layers[0].attn
        return 2 * len(self.layers) * rows * a.nkv * a.hd * self.norm.weight.element_size()

    def loaders(self) -> dict:
        """Checkpoint tensor name -> the Shard that copies this rank's slice of it into place."""
        out = {"model.embed_tokens.weight": self.embed_tokens.loader(), "model.norm.weight": self.norm.loader()}
        if not self.cfg.tie_embeddings:
            out["lm_head.weight"] = self.head.loader()
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}"
            out |= {f"{p}.input_layernorm.weight": layer.input_norm.loader(),
                    f"{p}.post_attention_layernorm.weight": layer.post_attn_norm.loader()}
            out |= layer.attn.loaders(f"{p}.self_attn") | layer.mlp.loaders(f"{p}.mlp")
        return out

    @torch.no_grad()
    def init_random_(self, seed: int = 0):
        """Random weights (benchmarks): std 0.02 matrices, unit norms. Every rank draws the same
        numbers, so replicated weights (norms, a router) agree across ranks."""
        g = torch.Generator(self.norm.weight.device).manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=g)
        return self
