"""The model families, their full-size presets, and where a model comes from: a local HF directory,
a hub id, a preset (random weights, for benchmarks) or the tiny demo checkpoint made here.

    model = models.load(models.resolve("meta-llama/Llama-3.3-70B-Instruct", d), d, torch.bfloat16)
    model = models.load("llama-3.3-70b", d, torch.bfloat16, layers=8)        # random weights
"""
import dataclasses
import json
import os

import torch
import torch.distributed as dist

import llama
import mixtral
import qwen
from comm import Dist

FAMILIES = {"llama": llama, "qwen2": qwen, "mixtral": mixtral}   # config.json model_type -> model file
PRESETS = {name: hf for module in FAMILIES.values() for name, hf in module.PRESETS.items()}   # real config.json values
DEMO_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tokenweave", "demo-llama-v2")


def config(hf: dict):
    """(model file, its Config) for a config.json's contents."""
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        raise ValueError(f"model_type {kind!r} is not supported; supported: {', '.join(FAMILIES)}")
    module = FAMILIES[kind]
    return module, module.Config.from_hf(hf)


def read_json(path: str, name: str) -> dict:
    """path/name parsed, {} if absent; a clear error if it is not JSON."""
    f = os.path.join(path, name)
    if not os.path.exists(f):
        return {}
    try:
        with open(f) as fh:
            return json.load(fh)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{f} is not valid JSON: {e}") from None


def load(spec: str, d: Dist, dtype: torch.dtype, layers: int | None = None, log=lambda s: None):
    """The sharded model: a preset name (random weights) or a checkpoint directory (see resolve).
    layers: keep only the first this many layers (quick benchmarks)."""
    if spec in PRESETS:
        module, cfg = config(PRESETS[spec])
    else:
        hf = read_json(spec, "config.json")
        if not hf:
            raise FileNotFoundError(f"no config.json in {spec}")
        module, cfg = config(hf)
    if layers:
        cfg = dataclasses.replace(cfg, n_layers=layers)
    model = llama.build(module.Transformer, cfg, d, dtype)
    if spec in PRESETS:
        return model.init_random_()
    log(f"loading {spec} ({cfg.model_type}, {cfg.n_layers} layers, TP {d.world}, {dtype}) on {d.device.type}")
    return llama.load_checkpoint(model, spec, log=log)


def eos_ids(model, path: str) -> set:
    """The ids that end a sequence: config.json's and generation_config.json's."""
    gen = read_json(path, "generation_config.json").get("eos_token_id")
    return set(model.cfg.eos_ids) | set(gen if isinstance(gen, list) else [gen] if gen is not None else [])


# ----------------------------------------------------------------------------- where a checkpoint comes from


def resolve(name: str | None, d: Dist) -> str:
    """A checkpoint directory for --model: None is the demo (made once), a directory is itself, a
    hub id is downloaded (config, safetensors, tokenizer) by rank 0 first."""
    if name is None:
        first_rank_then_others(d, lambda: os.path.isdir(DEMO_DIR) or make_demo(DEMO_DIR))
        return DEMO_DIR
    if os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise FileNotFoundError(f"model {name} is a file: give the checkpoint's directory")
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise FileNotFoundError(f"model {name}: no such directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    def download(**kw):
        try:
            return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*"], **kw)
        except GatedRepoError:
            raise ValueError(f"{name} is gated: accept its license on the hub and log in (`hf auth login`)") from None
        except RepositoryNotFoundError:
            raise FileNotFoundError(f"model {name}: not a local directory, nor a model on the hub") from None
        except LocalEntryNotFoundError:
            raise ConnectionError(f"cannot download {name}: offline and not in the local cache; "
                                  f"download it where there is network, or pass a local directory") from None
    first_rank_then_others(d, download)
    return download(local_files_only=True) if d.rank else download()


def first_rank_then_others(d: Dist, fn):
    """Rank 0 runs fn (a download, a build) before the others, which then find it done."""
    if d.rank == 0:
        fn()
    if d.world > 1:
        dist.barrier()


DEMO_CONFIG = dict(model_type="llama", hidden_size=128, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, head_dim=16, intermediate_size=256, rms_norm_eps=1e-5,
                   rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=2048,
                   bos_token_id=0, eos_token_id=1, torch_dtype="bfloat16")


def make_demo(path: str):
    """A tiny random-weight Llama in HF layout with a BPE tokenizer trained here: enough to run the
    whole system without downloading anything. Written to a temporary directory, then renamed."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    text = ("TokenWeave splits the tokens of a step into two halves and overlaps the communication of one "
            "half with the computation of the other. The quick brown fox jumps over the lazy dog. "
            "Tensor parallel layers end with an all-reduce; fusing it with the residual add and RMSNorm "
            "saves memory traffic. Once upon a time there was a small model with random weights.")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text] * 50, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    hf = DEMO_CONFIG | {"vocab_size": tok.get_vocab_size()}
    # The checkpoint's tensor names and shapes are the model's own loaders' (at TP 1, each Shard's
    # destination is the whole tensor), built on the meta device: no memory.
    meta = llama.build(llama.Transformer, llama.Config.from_hf(hf), Dist(device=torch.device("meta")), torch.float)
    g = torch.Generator().manual_seed(1234)
    tensors = {name: (torch.ones(s.dest.shape) if name.endswith("norm.weight") else   # std 1/sqrt(fan in):
                      torch.randn(s.dest.shape, generator=g) / s.dest.shape[-1] ** 0.5    # clear winners
                      ).to(torch.bfloat16) for name, s in sorted(meta.loaders().items())}
    tmp = f"{path}.tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    tok.save(os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf | {"architectures": ["LlamaForCausalLM"]}, f, indent=1)
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "chat_template":
                   "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                   "{% if add_generation_prompt %}assistant:{% endif %}"}, f, indent=1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.replace(tmp, path)
