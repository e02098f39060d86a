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

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from weave import Batch, Dist

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


# The real Llama-3.3-70B-Instruct config.json values, so benchmarks build the full shape.
PRESETS = {"llama-3.3-70b": dict(
    model_type="llama", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
    num_key_value_heads=8, head_dim=128, intermediate_size=28672, vocab_size=128256, rms_norm_eps=1e-5,
    rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192),
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
        return lambda sl: copy_checked(getattr(self, param)[lo:lo + n], sl[self.d.rank * n:(self.d.rank + 1) * n])


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
        return lambda sl: copy_checked(self.weight, sl[:, r * n:(r + 1) * n])


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
        return lambda sl: copy_checked(self.weight[:max(hi - self.start, 0)], sl[self.start:hi])


class RMSNorm(nn.Module):
    """Only holds the weight: the norm itself runs inside the comm point (weave.add_rmsnorm_)."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden), requires_grad=False)

    def loader(self):
        return lambda sl: copy_checked(self.weight, sl[:])


def copy_checked(param, loaded):
    if param.shape != loaded.shape:
        raise ValueError(f"expected shape {tuple(param.shape)}, the checkpoint has {tuple(loaded.shape)}")
    param.copy_(loaded)


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


def apply_rope(x, cos, sin):
    """x (T, heads, hd) in HF's rotate-half layout: pairs are (i, i + hd/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ----------------------------------------------------------------------------- attention and MLP


class Attention(nn.Module):
    def __init__(self, cfg: Config, d: Dist):
        super().__init__()
        if cfg.n_kv_heads % d.world:
            raise ValueError(f"tensor parallel size {d.world} must divide the {cfg.n_kv_heads} KV heads; "
                             f"use a TP size that divides {cfg.n_kv_heads}")
        self.nh, self.nkv, self.hd = cfg.n_heads // d.world, cfg.n_kv_heads // d.world, cfg.head_dim
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.qkv = ColumnParallel(d, cfg.hidden, [q, kv, kv], bias=cfg.qkv_bias, what="attention heads")
        self.o = RowParallel(d, q, cfg.hidden, what="attention heads")
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.k_cache = self.v_cache = None

    def allocate_cache(self, n_slots: int, max_len: int):
        shape = (n_slots, max_len, self.nkv, self.hd)   # (slots, positions, nkv, hd)
        self.k_cache = torch.zeros(shape, dtype=self.o.weight.dtype, device=self.o.weight.device)
        self.v_cache = torch.zeros_like(self.k_cache)

    def forward(self, h, batch: Batch):
        """h (T, H): x in, this rank's partial of o_proj out."""
        T = h.shape[0]
        q, k, v = self.qkv(h).split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        angles = batch.positions[:, None].float() * self.inv_freq            # (T, hd/2)
        angles = torch.cat((angles, angles), dim=-1)[:, None]                 # (T, 1, hd)
        cos, sin = angles.cos().to(h.dtype), angles.sin().to(h.dtype)
        q = apply_rope(q.view(T, self.nh, self.hd), cos, sin)                 # (T, nh, hd)
        k = apply_rope(k.view(T, self.nkv, self.hd), cos, sin)                # (T, nkv, hd)
        self.k_cache[batch.slots, batch.positions] = k
        self.v_cache[batch.slots, batch.positions] = v.view(T, self.nkv, self.hd)
        o = self.attend(q, batch)                                             # (T, nh, hd)
        self.o(o.view(T, self.nh * self.hd), out=h)

    def attend(self, q, batch: Batch):
        if batch.is_decode:   # one query per sequence: all sequences in one call, padded to the longest
            slots = batch.slots
            L = max(start + 1 for _, start, _ in batch.seqs)
            K = self.k_cache[slots, :L].transpose(1, 2)                        # (B, nkv, L, hd)
            V = self.v_cache[slots, :L].transpose(1, 2)
            mask = torch.arange(L, device=q.device)[None] <= batch.positions[:, None]   # (B, L)
            o = F.scaled_dot_product_attention(q[:, :, None], K, V, attn_mask=mask[:, None, None],
                                               enable_gqa=True)               # (B, nh, 1, hd)
            return o[:, :, 0]
        o, off = torch.empty_like(q), 0
        for slot, start, n in batch.seqs:   # prefill: each sequence against its whole cached prefix
            L = start + n
            qs = q[off:off + n].transpose(0, 1)[None]                         # (1, nh, n, hd)
            K = self.k_cache[slot, :L].transpose(0, 1)[None]                  # (1, nkv, L, hd)
            V = self.v_cache[slot, :L].transpose(0, 1)[None]
            if start:   # a chunk after a cached prefix (the second part of a straddling sequence)
                out = attend_after_prefix(qs, K, V, start)
            else:
                out = F.scaled_dot_product_attention(qs, K, V, is_causal=True, enable_gqa=True)
            o[off:off + n] = out[0].transpose(0, 1)
            off += n
        return o

    def loaders(self, p: str) -> dict:
        out = {f"{p}.{n}_proj.weight": self.qkv.loader(i) for i, n in enumerate("qkv")}
        if self.qkv.bias is not None:
            out.update({f"{p}.{n}_proj.bias": self.qkv.loader(i, "bias") for i, n in enumerate("qkv")})
        return out | {f"{p}.o_proj.weight": self.o.loader()}


def attend_after_prefix(q, k, v, start: int):
    """q (1, nh, n, hd) at positions start.. of a sequence; k, v (1, nkv, start + n, hd): each query
    sees the whole prefix and, causally, its own chunk. On CUDA that is two cuDNN calls merged by
    their log-sum-exp: SDPA routes the lower-right causal mask to a FlashAttention-2 kernel that
    ran 1.7x slower per FLOP than cuDNN on H200, which cost the weave ~10% at 16K tokens."""
    global _cudnn_split
    if q.device.type == "cuda" and _cudnn_split:
        try:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))   # (1, nh, L, hd)
            o1, lse1 = cudnn_attention(q, k[:, :, :start], v[:, :, :start], causal=False)    # the prefix
            o2, lse2 = cudnn_attention(q, k[:, :, start:], v[:, :, start:], causal=True)     # the chunk
            return torch.lerp(o2.float(), o1.float(), torch.sigmoid(lse1 - lse2)).to(q.dtype)
        except RuntimeError as e:   # an older cuDNN or torch: same result, slower kernel
            _cudnn_split = False
            print(f"warning: split cuDNN attention unavailable ({str(e).splitlines()[0]}); "
                  f"using SDPA's lower-right causal mask", flush=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]),
                                          enable_gqa=True)


_cudnn_split = True


def cudnn_attention(q, k, v, causal: bool):
    """Attention output (1, nh, n, hd) and its log-sum-exp (1, nh, n, 1), from cuDNN."""
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q.contiguous(), k, v, None, True, 0.0, causal, False)
    return out[0], out[1].reshape(out[0].shape[:-1]).unsqueeze(-1).float()


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
    def __init__(self, cfg: Config, d: Dist, mlp_cls):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden, cfg.eps)
        self.attn = Attention(cfg, d)
        self.post_attn_norm = RMSNorm(cfg.hidden, cfg.eps)
        self.mlp = mlp_cls(cfg, d)


class Transformer(nn.Module):
    MLP = MLP              # Mixtral swaps in its MoE block
    weave_threshold = 1024  # tokens below which no split pays

    def __init__(self, cfg: Config, d: Dist):
        super().__init__()
        self.cfg, self.d = cfg, d
        self.embed_tokens = VocabParallel(d, cfg.vocab, cfg.hidden)
        self.layers = nn.ModuleList(Layer(cfg, d, self.MLP) for _ in range(cfg.n_layers))
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
        if max_len > self.cfg.max_positions:
            raise ValueError(f"{max_len} positions exceed the model's context of {self.cfg.max_positions}")
        for layer in self.layers:
            layer.attn.allocate_cache(n_slots, max_len)

    def loaders(self) -> dict:
        """Checkpoint tensor name -> a function that copies this rank's slice of it into place."""
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
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
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
        with safe_open(fpath, framework="pt", device="cpu") as f:
            for name in f.keys():
                if name in loaders:
                    try:
                        loaders[name](f.get_slice(name))
                    except ValueError as e:
                        raise ValueError(f"tensor {name} in {fname}: {e}") from None
                    seen.add(name)
        log(f"loaded shard {i + 1}/{len(files)} ({fname}) in {time.time() - t0:.1f}s")
    missing = missing or sorted(set(loaders) - seen)
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} tensors, e.g. {missing[0]}")
    return model
