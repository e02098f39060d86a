"""Llama 3 for tensor-parallel inference, as a list of compute stages (see weave.py).

Every layer is built already sharded: rank r of N holds 1/N of the heads and of the MLP's
intermediate features, and reads only its slice of each checkpoint tensor. Shapes in comments:
T tokens of the step, H hidden, nh/nkv heads of this rank (local), hd head dim, I/N local MLP.
"""
import dataclasses
import json
import math
import os
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from comm import Dist, load_ext
from weave import Batch

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
        the one transformers 5 writes (rope_parameters, dtype)."""
        for key in ("attention_bias", "mlp_bias"):
            if c.get(key):
                raise ValueError(f"config.json sets {key}: true, which this Llama does not support")
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", c.get("rope_theta", 10000.0))
        if rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = None
        eos = c.get("eos_token_id")
        return cls(
            model_type=c["model_type"], hidden=c["hidden_size"], n_layers=c["num_hidden_layers"],
            n_heads=c["num_attention_heads"], n_kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
            head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
            intermediate=c["intermediate_size"], vocab=c["vocab_size"], eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=theta, rope_scaling=rope, tie_embeddings=c.get("tie_word_embeddings", False),
            max_positions=c.get("max_position_embeddings", 4096),
            eos_ids=tuple(eos if isinstance(eos, list) else [eos] if eos is not None else []),
            dtype=str(c.get("dtype") or c.get("torch_dtype") or "bfloat16"))


# The real Llama-3.3-70B-Instruct and Llama-3.1-8B-Instruct config.json values, so benchmarks build full shapes.
PRESETS = {"llama-3.3-70b": dict(
    model_type="llama", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
    num_key_value_heads=8, head_dim=128, intermediate_size=28672, vocab_size=128256, rms_norm_eps=1e-5,
    rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192),
    tie_word_embeddings=False, max_position_embeddings=131072, eos_token_id=[128001, 128008, 128009],
    torch_dtype="bfloat16"),
    # Llama-3.1-8B: the one-GPU shape of the decode and serve benchmarks.
    "llama-3.1-8b": dict(
    model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, intermediate_size=14336, vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192),
    tie_word_embeddings=False, max_position_embeddings=131072, eos_token_id=[128001, 128008, 128009],
    torch_dtype="bfloat16")}

# ----------------------------------------------------------------------------- sharded layers


def shard(n: int, d: Dist, what: str) -> int:
    if n % d.world:
        raise ValueError(f"tensor parallel size {d.world} does not divide {what} ({n}); "
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
        return Shard(getattr(self, param)[lo:lo + n], rows=slice(self.d.rank * n, (self.d.rank + 1) * n))


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
        return Shard(self.weight, cols=slice(r * n, (r + 1) * n))


class VocabParallel(nn.Module):
    """Embedding or LM head with the vocabulary split across ranks (the last shard zero-padded)."""

    def __init__(self, d: Dist, vocab: int, hidden: int):
        super().__init__()
        self.d, self.vocab, self.n = d, vocab, -(-vocab // d.world)
        self.start = d.rank * self.n
        self.weight = nn.Parameter(torch.zeros(self.n, hidden), requires_grad=False)

    def embed(self, tokens, out):
        """out (T, H) <- this rank's partial of the embedding: rows of ids it holds, zero elsewhere."""
        ids = tokens - self.start
        mine = (ids >= 0) & (ids < self.n)
        out.copy_(F.embedding(ids.clamp(0, self.n - 1), self.weight) * mine[:, None])

    def loader(self):
        hi = min(self.start + self.n, self.vocab)
        return Shard(self.weight[:max(hi - self.start, 0)], rows=slice(self.start, hi))


class RMSNorm(nn.Module):
    """Only holds the weight: the norm itself runs inside the comm point (weave.add_rmsnorm_)."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden), requires_grad=False)

    def loader(self):
        return Shard(self.weight)


@dataclasses.dataclass
class Shard:
    """Where one checkpoint tensor goes: rows x cols of it (this rank's slice) into dest. At TP 1
    dest has the tensor's full shape, which is how models.make_demo learns the checkpoint layout."""
    dest: torch.Tensor
    rows: slice | None = None     # None: all
    cols: slice | None = None

    def __call__(self, sl):
        """sl: the tensor in the file (safetensors' lazy slice: only this rank's part is read)."""
        rows = self.rows or slice(None)
        part = sl[rows] if self.cols is None else sl[rows, self.cols]
        if self.dest.shape != part.shape:
            raise ValueError(f"expected shape {tuple(self.dest.shape)}, the checkpoint has {tuple(part.shape)}")
        self.dest.copy_(part)


# ----------------------------------------------------------------------------- rope


def rope_inv_freq(cfg: Config) -> torch.Tensor:
    """(hd/2,) inverse frequencies; llama3 scaling divides the low frequencies by `factor` and
    interpolates the band between low_freq_factor and high_freq_factor."""
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float) / cfg.head_dim)
    s = cfg.rope_scaling
    if s is None:
        return inv
    kind = s.get("rope_type", s.get("type"))
    if kind != "llama3":
        raise ValueError(f"rope scaling {kind!r} is not supported (only default and llama3)")
    old = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = ((old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])).clamp(0, 1)
    return (1 - smooth) * inv / s["factor"] + smooth * inv


def rope_table(cfg: Config, max_len: int, dtype, device) -> torch.Tensor:
    """(max_len, 2, hd): cos and sin of every position's angles, computed in fp32 and cast to the
    model's dtype as transformers does; a step gathers its rows once per layer by position."""
    angles = torch.arange(max_len, device=device, dtype=torch.float)[:, None] * rope_inv_freq(cfg).to(device)
    angles = torch.cat((angles, angles), dim=-1)                              # (max_len, hd)
    return torch.stack((angles.cos(), angles.sin()), dim=1).to(dtype)


def apply_rope(x, cos, sin):
    """x (T, heads, hd) in HF's rotate-half layout: pairs are (i, i + hd/2); cos, sin (T, 1, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ----------------------------------------------------------------------------- attention and MLP


class Attention(nn.Module):
    """GQA attention over a flat KV cache: (slots x max_len, nkv, hd), a token of slot s at position p
    in row s * max_len + p (Batch.kv_rows). A step writes its K/V there first, then attends."""

    def __init__(self, cfg: Config, d: Dist, cudnn_split: bool):
        super().__init__()
        if cfg.n_kv_heads % d.world:
            raise ValueError(f"tensor parallel size {d.world} must divide the {cfg.n_kv_heads} KV heads; "
                             f"use a TP size that divides {cfg.n_kv_heads}")
        self.nh, self.nkv, self.hd = cfg.n_heads // d.world, cfg.n_kv_heads // d.world, cfg.head_dim
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.qkv = ColumnParallel(d, cfg.hidden, [q, kv, kv], bias=cfg.qkv_bias, what="attention heads")
        self.o = RowParallel(d, q, cfg.hidden, what="attention heads")
        self.cudnn_split = cudnn_split
        self.k_cache = self.v_cache = self.rope = self.ext = None
        self.max_len = 0

    def allocate_cache(self, n_slots: int, max_len: int, rope: torch.Tensor, ext):
        """ext: the compiled kernels (bf16 on CUDA), for the fused RoPE + cache write; else None."""
        self.k_cache = torch.zeros(n_slots * max_len, self.nkv, self.hd, dtype=self.o.weight.dtype,
                                   device=self.o.weight.device)                # (slots * max_len, nkv, hd)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.rope, self.max_len, self.ext = rope, max_len, ext                 # rope shared by all layers

    def forward(self, h, batch: Batch):
        """h (T, H): x in, this rank's partial of o_proj out."""
        T, nh, nkv, hd = h.shape[0], self.nh, self.nkv, self.hd
        qkv = self.qkv(h)                                                     # (T, (nh + 2 nkv) hd)
        if self.ext is not None:      # one kernel: q rotated in place, k and v into the cache
            self.ext.rope_kv_cache.unchecked(qkv, self.rope, batch.positions, batch.kv_rows, self.k_cache, self.v_cache)
            q = qkv[:, :nh * hd].view(T, nh, hd)
        else:
            cos, sin = self.rope[batch.positions].unsqueeze(2).unbind(1)      # (T, 1, hd) each
            qk = apply_rope(qkv[:, :(nh + nkv) * hd].view(T, nh + nkv, hd), cos, sin)   # (T, nh + nkv, hd)
            q = qk[:, :nh]
            self.k_cache[batch.kv_rows] = qk[:, nh:]
            self.v_cache[batch.kv_rows] = qkv[:, (nh + nkv) * hd:].view(T, nkv, hd)
        o = self.attend(q, batch)                                             # (T, nh, hd)
        self.o(o.view(T, nh * hd), out=h)

    def attend(self, q, batch: Batch):
        """q (T, nh, hd) against the cache, which holds this step's keys and values already."""
        single = batch.n_single
        if single == batch.T:
            return self.attend_single(q, batch)
        o = torch.empty_like(q)
        if single:
            o[:single] = self.attend_single(q[:single], batch)
        off = single
        for slot, start, n in batch.seqs[single:]:    # prompt chunks: each against its cached prefix
            qs = q[off:off + n].transpose(0, 1)[None]                         # (1, nh, n, hd)
            rows = slice(slot * self.max_len, slot * self.max_len + start + n)
            K, V = (c[rows].transpose(0, 1)[None] for c in (self.k_cache, self.v_cache))   # (1, nkv, start + n, hd)
            if start == 0:   # a prompt's first chunk: plain causal attention
                out = F.scaled_dot_product_attention(qs, K, V, is_causal=True, enable_gqa=True)
            else:
                out = self.attend_after_prefix(qs, K, V, start)
            o[off:off + n] = out[0].transpose(0, 1)
            off += n
        return o

    def attend_single(self, q, batch: Batch):
        """One query per sequence (decode), all sequences in one call that reads the cache in place:
        FlashAttention's variable-length kernel with per-sequence key ranges [kv_starts, + ctx_lens).
        Elsewhere (CPU), the same through SDPA over the gathered rows."""
        B = q.shape[0]
        if q.is_cuda:
            return torch.ops.aten._flash_attention_forward(
                q, self.k_cache, self.v_cache, batch.q_starts, batch.kv_starts, 1, self.max_len, 0.0, False, False,
                seqused_k=batch.ctx_lens)[0]                                   # (B, nh, hd)
        L = max(start + 1 for _, start, _ in batch.seqs[:B])
        rows = batch.kv_starts[:B, None] + torch.arange(L, device=q.device)    # (B, L)
        K, V = (c[rows].transpose(1, 2) for c in (self.k_cache, self.v_cache))   # (B, nkv, L, hd)
        mask = torch.arange(L, device=q.device) < batch.ctx_lens[:, None]      # (B, L)
        o = F.scaled_dot_product_attention(q[:, :, None], K, V, attn_mask=mask[:, None, None], enable_gqa=True)
        return o[:, :, 0]                                                      # (B, nh, hd)

    def attend_after_prefix(self, q, k, v, start: int):
        """q (1, nh, n, hd) at positions start.. of a sequence; k, v (1, nkv, start + n, hd): each query
        sees the whole prefix and, causally, its own chunk. On CUDA that is two cuDNN calls merged by
        their log-sum-exp: SDPA routes the lower-right causal mask to a FlashAttention-2 kernel that
        ran 1.7x slower per FLOP than cuDNN on H200, which cost the weave ~10% at 16K tokens."""
        if self.cudnn_split and q.is_cuda:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))   # (1, nh, L, hd)
            o1, lse1 = cudnn_attention(q, k[:, :, :start], v[:, :, :start], causal=False)    # the prefix
            o2, lse2 = cudnn_attention(q, k[:, :, start:], v[:, :, start:], causal=True)     # the chunk
            return torch.lerp(o2.float(), o1.float(), torch.sigmoid(lse1 - lse2)).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]),
                                              enable_gqa=True)

    def loaders(self, p: str) -> dict:
        out = {f"{p}.{n}_proj.weight": self.qkv.loader(i) for i, n in enumerate("qkv")}
        if self.qkv.bias is not None:
            out.update({f"{p}.{n}_proj.bias": self.qkv.loader(i, "bias") for i, n in enumerate("qkv")})
        return out | {f"{p}.o_proj.weight": self.o.loader()}


def cudnn_attention(q, k, v, causal: bool):
    """Attention output (1, nh, n, hd) and its log-sum-exp (1, nh, n, 1), from cuDNN."""
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q.contiguous(), k, v, None, True, 0.0, causal, False)
    return out[0], out[1].reshape(out[0].shape[:-1]).unsqueeze(-1).float()


def cudnn_split_works(device: torch.device, dtype) -> str:
    """'' if the split cuDNN attention runs here, else why not (an older cuDNN or torch)."""
    if device.type != "cuda":
        return "not on CUDA"
    try:
        q = torch.zeros(1, 2, 8, 64, device=device, dtype=dtype)
        cudnn_attention(q, q[:, :, :4], q[:, :, :4], causal=False)
        return ""
    except RuntimeError as e:
        return str(e).splitlines()[0]


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up in one GEMM."""

    def __init__(self, cfg: Config, d: Dist):
        super().__init__()
        self.gate_up = ColumnParallel(d, cfg.hidden, [cfg.intermediate] * 2, what="MLP features")
        self.down = RowParallel(d, cfg.intermediate, cfg.hidden, what="MLP features")

    def forward(self, h, batch: Batch):
        """h (T, H): x in, this rank's partial of down_proj out."""
        gate, up = self.gate_up(h).chunk(2, dim=-1)                           # (T, I/N) each
        self.down(F.silu(gate) * up, out=h)

    def loaders(self, p: str) -> dict:
        return {f"{p}.gate_proj.weight": self.gate_up.loader(0), f"{p}.up_proj.weight": self.gate_up.loader(1),
                f"{p}.down_proj.weight": self.down.loader()}


# ----------------------------------------------------------------------------- the model


class Layer(nn.Module):
    def __init__(self, cfg: Config, d: Dist, mlp_cls, cudnn_split: bool):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden, cfg.eps)
        self.attn = Attention(cfg, d, cudnn_split)
        self.post_attn_norm = RMSNorm(cfg.hidden, cfg.eps)
        self.mlp = mlp_cls(cfg, d)


class Transformer(nn.Module):
    MLP = MLP              # Mixtral swaps in its MoE block
    weave_threshold = 1024  # tokens below which no split pays

    def __init__(self, cfg: Config, d: Dist):
        super().__init__()
        self.cfg, self.d = cfg, d
        why = cudnn_split_works(d.device, torch.get_default_dtype())
        if why and d.device.type == "cuda" and d.rank == 0:
            warnings.warn(f"split cuDNN attention unavailable ({why}); chunks after a cached prefix use "
                          f"SDPA's lower-right causal mask (slower)", stacklevel=2)
        self.embed_tokens = VocabParallel(d, cfg.vocab, cfg.hidden)
        self.layers = nn.ModuleList(Layer(cfg, d, self.MLP, not why) for _ in range(cfg.n_layers))
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

    def allocate_cache(self, n_slots: int, max_len: int):
        """KV cache for n_slots sequences of up to max_len positions each (and their RoPE table)."""
        if max_len > self.cfg.max_positions:
            raise ValueError(f"{max_len} positions exceed the model's context of {self.cfg.max_positions}")
        for layer in self.layers:      # the old cache goes first: two would not fit
            layer.attn.k_cache = layer.attn.v_cache = None
        w = self.norm.weight
        rope = rope_table(self.cfg, max_len, w.dtype, w.device)
        ext = load_ext(self.d) if w.dtype == torch.bfloat16 and self.cfg.head_dim % 8 == 0 else None
        for layer in self.layers:
            layer.attn.allocate_cache(n_slots, max_len, rope, ext)

    def cache_bytes(self, n_slots: int, max_len: int) -> int:
        """What allocate_cache takes on this rank: K and V of every layer."""
        a = self.layers[0].attn
        return 2 * len(self.layers) * n_slots * max_len * a.nkv * a.hd * self.norm.weight.element_size()

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


# ----------------------------------------------------------------------------- loading


def build(cls, cfg: Config, d: Dist, dtype: torch.dtype) -> Transformer:
    """The sharded model on d.device in `dtype`, weights uninitialized (nothing is materialized
    twice; RoPE frequencies stay fp32)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(d.device):
            return cls(cfg, d)
    finally:
        torch.set_default_dtype(default)


@torch.no_grad()
def load_checkpoint(model: Transformer, path: str, log=print):
    """Copies this rank's slice of every tensor from the safetensors files in `path` (one file, or
    shards listed by model.safetensors.index.json) into the model, reading only that slice."""
    from safetensors import safe_open
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a safetensors index (no readable weight_map: {e})") from None
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        weight_map = None
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    loaders = model.loaders()
    if weight_map is not None:
        missing = sorted(set(loaders) - set(weight_map))
        files = sorted(set(weight_map[n] for n in loaders if n in weight_map))
    else:
        files, missing = ["model.safetensors"], []
    t0, seen = time.time(), set()
    for i, fname in enumerate(files):
        fpath = os.path.join(path, fname)
        if not os.path.exists(fpath):
            raise FileNotFoundError(f"checkpoint shard {fname} is listed in the index but missing from {path}")
        try:
            with safe_open(fpath, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name in loaders:
                        try:
                            loaders[name](f.get_slice(name))
                        except ValueError as e:   # a shape that does not fit
                            raise ValueError(f"tensor {name} in {fpath}: {e}") from None
                        seen.add(name)
        except ValueError:
            raise
        except Exception as e:      # safetensors' own errors: a truncated or corrupt file
            raise ValueError(f"{fpath} is not a readable safetensors file ({type(e).__name__}: {e}); "
                             f"it may be truncated: download it again") from None
        log(f"loaded shard {i + 1}/{len(files)} ({fname}) in {time.time() - t0:.1f}s")
    missing = missing or sorted(set(loaders) - seen)
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} tensors, e.g. {missing[0]}")
    return model
