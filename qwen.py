"""Qwen2 / Qwen2.5: Llama with biases on the q, k and v projections (not on o_proj).

Its other differences are values config.json already carries (rope theta 1e6, no rope scaling, rms
eps 1e-6, its vocabulary and EOS ids) and llama.Config.from_hf reads them. The biases are
column-parallel like their weights: rank r holds the bias entries of its own heads.
"""
import dataclasses

import llama
from comm import UserError


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


# The real Qwen2.5-72B-Instruct config.json values; its generation_config.json adds EOS 151643
# (<|endoftext|>) to config.json's 151645 (<|im_end|>), and run.py stops at both.
PRESETS = {"qwen2.5-72b": dict(
    model_type="qwen2", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
    intermediate_size=29568, vocab_size=152064, rms_norm_eps=1e-6, rope_theta=1000000.0,
    use_sliding_window=False, tie_word_embeddings=False, max_position_embeddings=32768,
    bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16")}
