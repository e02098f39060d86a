"""Qwen2 / Qwen2.5: Llama with biases on the q, k and v projections (not on o_proj).

Its other differences are values config.json already carries (rope theta 1e6, no rope scaling, rms
eps 1e-6, its vocabulary and EOS ids) and llama.Config.from_hf reads them. The biases are
column-parallel like their weights: rank r holds the bias entries of its own heads.
"""
import dataclasses

import llama
from group import UserError


@dataclasses.dataclass
class Config(llama.Config):
    model_type: str = "qwen2"
    qkv_bias: bool = True

    @classmethod
    def from_hf(cls, c: dict) -> "Config":
        # Sliding-window layers would need a windowed mask and cache; this attention sees the whole prefix.
        if c.get("use_sliding_window") or "sliding_attention" in (c.get("layer_types") or ()):
            raise UserError("sets use_sliding_window: true; sliding-window attention is not supported "
                            "(Qwen2.5 checkpoints ship with it off)")
        return super().from_hf(c)


Transformer = llama.Transformer
