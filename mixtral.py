"""Mixtral: Llama with a sparse mixture of experts in place of the MLP.

A router, replicated on every rank, sends each token to top_k of E experts. Every expert is a SwiGLU
sharded like llama.MLP on its intermediate features (w1 gate and w3 up column-parallel, w2 down
row-parallel), so each rank computes its slice of every chosen expert and the block ends in a
partial sum, like the MLP: the same comm point follows it. Shapes in comments: T tokens, H hidden,
E experts, k = top_k, I/N this rank's intermediate features per expert.
"""
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

import llama
from batch import Batch
from group import Dist, UserError
from llama import Shard


@dataclasses.dataclass
class Config(llama.Config):
    model_type: str = "mixtral"
    n_experts: int = 8
    top_k: int = 2

    @classmethod
    def from_hf(cls, c: dict) -> "Config":
        # transformers' Mixtral defaults, where a config.json leaves these out, differ from Llama's.
        cfg = super().from_hf({"rope_theta": 1e6, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072} | c)
        if (c.get("sliding_window") or cfg.max_positions) < cfg.max_positions:
            raise UserError(f"sets sliding_window: {c['sliding_window']}, shorter than the context; "
                            f"sliding-window attention is not supported")
        experts, k = llama.need(c, "num_local_experts", 8), llama.need(c, "num_experts_per_tok", 2)
        if k > experts:
            raise UserError(f"sets num_experts_per_tok {k} above num_local_experts {experts}")
        return dataclasses.replace(cfg, n_experts=experts, top_k=k)


class MoE(nn.Module):
    """Routing as transformers does it: softmax in fp32 over all experts, top-k, the k weights
    renormalized to sum to 1. Then two grouped GEMMs over the (token, choice) pairs sorted by expert."""

    def __init__(self, cfg: Config, d: Dist):
        super().__init__()
        self.d, self.k, E, H = d, cfg.top_k, cfg.n_experts, cfg.hidden
        self.n = llama.shard(cfg.intermediate, d, "expert MLP features")                  # I/N
        self.router = nn.Parameter(torch.empty(E, H), requires_grad=False)                # replicated
        self.w13 = nn.Parameter(torch.empty(E, 2 * self.n, H), requires_grad=False)       # [gate; up] rows
        self.w2 = nn.Parameter(torch.empty(E, H, self.n), requires_grad=False)

    def forward(self, h, batch: Batch):
        """h (T, H): x in, this rank's partial of the experts' weighted sum out."""
        x = h.clone()                                                   # h becomes the accumulator
        # x is the same bits on every rank, so every rank routes alike and runs its slice of each expert.
        probs = F.linear(x, self.router).float().softmax(dim=-1)        # (T, E)
        weights, experts = probs.topk(self.k, dim=-1)                   # (T, k)
        weights /= weights.sum(dim=-1, keepdim=True)
        # Group the (token, choice) pairs by expert. The group ends stay on the GPU: a host sync here
        # would stall the CPU from queueing the other half's work, and the overlap with it.
        pairs, order = experts.flatten().sort(stable=True)              # (T*k,) expert of each pair, sorted
        E = self.w13.shape[0]
        ends = torch.searchsorted(pairs, torch.arange(E, device=h.device), right=True).int()   # (E,)
        tokens = order // self.k                                        # (T*k,) the token of each pair
        # One grouped GEMM runs every expert on its rows; mat_b is (E, K, N): the weights transposed.
        gate_up = torch._grouped_mm(x[tokens], self.w13.transpose(1, 2), offs=ends)   # (T*k, 2I/N)
        y = torch._grouped_mm(self.act(gate_up), self.w2.transpose(1, 2), offs=ends)   # (T*k, H) partial
        # Weight in fp32, add in h's dtype, pairs in expert order: as transformers' loop over experts.
        h.zero_().index_add_(0, tokens, (y * weights.flatten()[order, None]).to(h.dtype))

    def act(self, gate_up):
        return llama.swiglu(gate_up)

    def loaders(self, p: str) -> dict:
        r, n, H = self.d.rank, self.n, self.w2.shape[1]
        mine, full = slice(r * n, (r + 1) * n), n * self.d.world
        out = {f"{p}.gate.weight": Shard(self.router, tuple(self.router.shape))}
        for e in range(self.w13.shape[0]):
            q = f"{p}.experts.{e}"
            out |= {f"{q}.w1.weight": Shard(self.w13[e, :n], (full, H), rows=mine),
                    f"{q}.w3.weight": Shard(self.w13[e, n:], (full, H), rows=mine),
                    f"{q}.w2.weight": Shard(self.w2[e], (H, full), cols=mine)}
        return out


class Transformer(llama.Transformer):
    MLP = MoE
    # Each half's grouped GEMMs read every expert's weights again, which costs a small step more than all
    # its communication could hide; 8K is the smallest step with room to gain (docs/results.md, "the split's
    # own cost"; TokenWeave's threshold is 2K).
    weave_threshold = 8192

    def __init__(self, cfg: Config, d: Dist):
        super().__init__(cfg, d)
        k, n = cfg.top_k, self.layers[0].mlp.n
        # A grouped GEMM over the T*k pairs fills about the waves of one GEMM over T rows with k times
        # the width. The router's E columns are negligible.
        self.gemm_widths = self.gemm_widths[:2] + [2 * n * k, cfg.hidden * k]

    def loaders(self) -> dict:
        # The hub checkpoints name the block block_sparse_moe where Llama has mlp.
        return {name.replace(".mlp.", ".block_sparse_moe."): f for name, f in super().loaders().items()}
