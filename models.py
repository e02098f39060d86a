"""The model families and their full-size presets; where a model comes from (a local HF directory,
a hub id, a preset with random weights for benchmarks, or the tiny demo checkpoint made here); its
weights, of which each rank reads only its slices; and its tokenizer.

    path = models.resolve("meta-llama/Llama-3.3-70B-Instruct", d)      # downloads once
    model = models.load(path, d, torch.bfloat16)
    model = models.load("llama-3.3-70b", d, torch.bfloat16, layers=8)  # random weights
"""
import dataclasses
import json
import os
import shutil
import tempfile
import time

import torch

import llama
import mixtral
import qwen
from group import Dist, UserError

FAMILIES = {"llama": llama, "qwen2": qwen, "mixtral": mixtral}   # config.json model_type -> model file
# Full-size shapes for benchmarks (random weights): the real config.json values of each model.
LLAMA_3_70B = dict(
    model_type="llama", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
    head_dim=128, intermediate_size=28672, vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192),
    tie_word_embeddings=False, max_position_embeddings=131072, eos_token_id=[128001, 128008, 128009],
    torch_dtype="bfloat16")
PRESETS = {
    "llama-3.3-70b": LLAMA_3_70B,
    # Llama-3.1-8B, the one-GPU shape of the decode and serve benchmarks: the 70B's config but its sizes.
    "llama-3.1-8b": LLAMA_3_70B | dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                       intermediate_size=14336),
    # Its generation_config.json adds EOS 151643 (<|endoftext|>) to config.json's 151645 (<|im_end|>),
    # and run.py stops at both.
    "qwen2.5-72b": dict(
        model_type="qwen2", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
        intermediate_size=29568, vocab_size=152064, rms_norm_eps=1e-6, rope_theta=1000000.0,
        use_sliding_window=False, tie_word_embeddings=False, max_position_embeddings=32768,
        bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16"),
    # Mixtral-8x22B-Instruct-v0.1, head_dim spelled out (6144 / 48).
    "mixtral-8x22b": dict(
        model_type="mixtral", hidden_size=6144, num_hidden_layers=56, num_attention_heads=48, num_key_value_heads=8,
        head_dim=128, intermediate_size=16384, num_local_experts=8, num_experts_per_tok=2, vocab_size=32768,
        rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False,
        max_position_embeddings=65536, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16"),
}
DEMO_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tokenweave", "demo-llama-v2")
# Tensors some exporters write that no model here reads (rotary caches): skipped by name.
HARMLESS = ("rotary_emb.inv_freq",)


def read_json(path: str, name: str):
    """path/name parsed, {} if absent; a clear error if it is not JSON."""
    f = os.path.join(path, name)
    if not os.path.exists(f):
        return {}
    try:
        with open(f) as fh:
            return json.load(fh)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{f} is not valid JSON: {e}") from None


def config(spec: str):
    """(model file, its Config) for a preset name or a checkpoint directory; errors name the file."""
    if spec in PRESETS:
        hf, where = PRESETS[spec], f"preset {spec}"
    else:
        where = os.path.join(spec, "config.json")
        if not os.path.exists(where):
            raise UserError(f"no config.json in {spec}: --model needs a checkpoint directory in HF layout "
                            f"(config.json, *.safetensors, tokenizer.json)")
        hf = read_json(spec, "config.json")
        if not isinstance(hf, dict):
            raise UserError(f"{where} is not a model config (a JSON object with model_type, hidden_size, ...)")
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        raise UserError(f"{where}: model_type {kind!r} is not supported; supported: {', '.join(FAMILIES)}")
    try:
        return FAMILIES[kind], FAMILIES[kind].Config.from_hf(hf)
    except UserError as e:
        raise UserError(f"{where} {e}") from None


def build(cls, cfg, d: Dist, dtype: torch.dtype):
    """The sharded model on d.device in `dtype`, weights uninitialized (nothing is materialized
    twice; RoPE frequencies are computed in fp32)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(d.device):
            return cls(cfg, d)
    finally:
        torch.set_default_dtype(default)


def load(spec: str, d: Dist, dtype: torch.dtype, layers: int | None = None, log=lambda s: None, memory: float = 1.0):
    """The sharded model: a preset name (random weights) or a checkpoint directory (see resolve).
    layers: keep only the first this many layers (quick benchmarks). The weights must fit in
    `memory` of the device's memory (of the host's available memory on the CPU): checked first, so
    a model too large fails in seconds with the size it needs, not minutes later by the OS."""
    module, cfg = config(spec)
    if layers:
        cfg = dataclasses.replace(cfg, n_layers=layers)
    check_fits(spec, module, cfg, d, dtype, memory)
    model = build(module.Transformer, cfg, d, dtype)
    if spec in PRESETS:
        return model.init_random_()
    log(f"loading {spec} ({cfg.model_type}, {cfg.n_layers} layers, TP {d.world}, {str(dtype)[6:]}) on {d.device.type}")
    return load_checkpoint(model, spec, log, partial=bool(layers))


def weight_bytes(module, cfg, d: Dist, dtype: torch.dtype) -> int:
    """What this rank's shards of the model take, counted on the meta device (no memory)."""
    meta = build(module.Transformer, cfg, Dist(d.rank, d.world, torch.device("meta")), dtype)
    return sum(p.numel() for p in meta.parameters()) * dtype.itemsize


def spare_bytes(d: Dist, memory: float) -> int:
    """Memory this process may still fill: `memory` of the GPU minus what is in use, or `memory` of
    what the host has available."""
    if d.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(d.device)
        return int(memory * total - (total - free))
    return int(memory * available_host_memory())


def check_fits(spec: str, module, cfg, d: Dist, dtype: torch.dtype, memory: float):
    need, spare = weight_bytes(module, cfg, d, dtype), spare_bytes(d, memory)
    if need > spare:
        where = f"GPU {d.device.index or 0}" if d.device.type == "cuda" else "this host"
        raise UserError(f"{spec} needs {size(need)} for its weights ({str(dtype)[6:]}) on each of {d.world} "
                        f"rank{'s' * (d.world > 1)}, and {where} has {size(max(spare, 0))} to spare (at "
                        f"--memory {memory:g}); raise --memory if it is low, use more GPUs (torchrun --nproc-per-node), "
                        f"or a machine with more memory")


def size(n: int) -> str:
    """n bytes for a reader: 262.8 GiB, 1.4 MiB, 20 bytes."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def available_host_memory() -> int:
    """Bytes the host can still give (MemAvailable: free plus reclaimable caches)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@torch.no_grad()
def load_checkpoint(model, path: str, log=print, partial: bool = False):
    """Copies this rank's slice of every tensor from the safetensors files in `path` (one file, or
    shards listed by model.safetensors.index.json) into the model, reading only that slice. Every
    tensor must have the full shape the config implies, and every tensor in the checkpoint must be
    used (but HARMLESS ones; a `partial` model, its first layers only, leaves the rest unread)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = read_json(path, "model.safetensors.index.json")
        if not isinstance(weight_map, dict) or not isinstance(weight_map.get("weight_map"), dict):
            raise UserError(f"{index} is not a safetensors index (no weight_map)")
        weight_map = weight_map["weight_map"]
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        weight_map = {name: "model.safetensors" for name in tensor_names(os.path.join(path, "model.safetensors"))}
    else:
        raise UserError(f"no model.safetensors or model.safetensors.index.json in {path}")
    loaders, cfg = model.loaders(), model.cfg
    missing = sorted(set(loaders) - set(weight_map))
    if missing:
        raise UserError(f"checkpoint {path} lacks {len(missing)} tensors, e.g. {missing[0]}")
    unused = sorted(n for n in weight_map if n not in loaders and not n.endswith(HARMLESS)
                    and not (cfg.tie_embeddings and n == "lm_head.weight"))   # tied: transformers ignores it too
    if unused and not partial:
        raise UserError(f"checkpoint {path} has {len(unused)} tensors the model does not use, e.g. {unused[0]}: "
                        f"its config.json ({cfg.n_layers} layers, {cfg.n_heads} heads, ...) does not match the "
                        f"weights; use the config.json that belongs to them")
    files = sorted(set(weight_map[n] for n in loaders))
    t0 = time.time()
    for i, fname in enumerate(files):
        fpath = os.path.join(path, fname)
        if not os.path.exists(fpath):
            raise UserError(f"checkpoint shard {fname} is listed in the index but missing from {path}")
        with open_safetensors(fpath) as f:
            for name in f.keys():
                if name in loaders:
                    try:
                        loaders[name](f.get_slice(name))
                    except UserError as e:   # a shape that disagrees with config.json
                        raise UserError(f"tensor {name} in {fpath}: {e}; config.json does not match the "
                                        f"weights") from None
        log(f"loaded shard {i + 1}/{len(files)} ({fname}) in {time.time() - t0:.1f}s")
    return model


class open_safetensors:
    """safe_open, with safetensors' own errors (a truncated or corrupt file) as one clear line."""

    def __init__(self, fpath):
        self.fpath = fpath

    def __enter__(self):
        from safetensors import safe_open
        try:
            self.f = safe_open(self.fpath, framework="pt", device="cpu")
            return self.f.__enter__()
        except Exception as e:   # safetensors raises its own SafetensorError and OSError
            raise UserError(f"{self.fpath} is not a readable safetensors file ({type(e).__name__}: {e}); "
                            f"it may be truncated: download it again") from None

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)


def tensor_names(fpath: str) -> list:
    with open_safetensors(fpath) as f:
        return list(f.keys())


def eos_ids(cfg, path: str | None) -> set:
    """The ids that end a sequence: config.json's and generation_config.json's."""
    gen = read_json(path, "generation_config.json").get("eos_token_id") if path else None
    return set(cfg.eos_ids) | set(gen if isinstance(gen, list) else [gen] if gen is not None else [])


# ----------------------------------------------------------------------------- the tokenizer


class Tokenizer:
    """A checkpoint's tokenizer.json (the `tokenizers` library) and its chat template."""

    def __init__(self, path: str, vocab: int):
        from tokenizers import Tokenizer as HFTokenizer
        f = os.path.join(path, "tokenizer.json")
        if not os.path.exists(f):
            raise UserError(f"no tokenizer.json in {path}: this runner needs a `tokenizers` tokenizer file")
        try:
            self.tok = HFTokenizer.from_file(f)
        except Exception as e:   # the tokenizers library raises a bare Exception
            raise UserError(f"{f} is not a readable tokenizer ({e}); it may be truncated: download it again") from None
        self.tok.no_padding()      # a file may turn either on: a batch would pad every prompt to the longest,
        self.tok.no_truncation()   # and a cut prompt would run silently; the engine says which prompt is too long
        ids = max(self.tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        if ids > vocab:
            raise UserError(f"{f} has token ids up to {ids - 1}, but the model has {vocab} embedding rows "
                            f"(config.json vocab_size): those ids would embed as zeros; use the tokenizer "
                            f"that belongs to this checkpoint")
        self.path, self.config = path, read_json(path, "tokenizer_config.json")

    def encode(self, prompts: list, chat: bool = False) -> list:
        """Token ids of each prompt, wrapped in the chat template when `chat`; in one batch, which the
        library encodes on all the host's cores."""
        if not chat:
            return [e.ids for e in self.tok.encode_batch(prompts)]
        render = self.chat_template()
        return [e.ids for e in self.tok.encode_batch([render(p) for p in prompts], add_special_tokens=False)]

    def decode(self, ids: list) -> str:
        return self.tok.decode(ids)

    def chat_template(self):
        """prompt -> the text the checkpoint's chat template makes of one user message, rendered as
        transformers' apply_chat_template renders it (sandbox_template); a template that does not
        render, or reaches outside the sandbox, is one clear error."""
        import jinja2
        tc, where = self.config, os.path.join(self.path, "tokenizer_config.json")
        template = tc.get("chat_template")
        if isinstance(template, list):   # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        if not template:
            raise UserError(f"--chat: the checkpoint in {self.path} has no chat template (tokenizer_config.json)")
        special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in tc.items()
                   if k in SPECIAL_TOKENS and isinstance(v, (str, dict))}

        def render(p):
            try:
                return t.render(messages=[{"role": "user", "content": p}], tools=None, documents=None,
                                add_generation_prompt=True, **special)
            except jinja2.TemplateError as e:    # SecurityError and raise_exception's errors among them
                raise UserError(f"--chat: the chat template in {where} does not render ({type(e).__name__}: {e}); "
                                f"fix it, or leave --chat out") from None
        try:
            t = sandbox_template(template)
        except jinja2.TemplateError as e:
            raise UserError(f"--chat: the chat template in {where} does not render ({type(e).__name__}: {e}); "
                            f"fix it, or leave --chat out") from None
        render("")
        return render


SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def sandbox_template(source: str):
    """A chat template compiled as transformers compiles it: jinja2's immutable sandbox (a template
    that comes with a checkpoint is untrusted code), trim_blocks and lstrip_blocks, loop controls,
    its tojson filter and its globals (raise_exception, strftime_now, namespace without underscore
    names)."""
    import datetime
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def no_underscore(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace cannot hold {name!r}")

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                no_underscore(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            no_underscore(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals |= {"raise_exception": raise_exception, "namespace": Namespace,
                    "strftime_now": lambda fmt: datetime.datetime.now().strftime(fmt)}
    return env.from_string(source)


# ----------------------------------------------------------------------------- where a checkpoint comes from


def resolve(name: str | None) -> str:
    """A checkpoint directory or preset for --model: None is the demo (made once), a preset or a
    directory is itself, a hub id is downloaded (config, safetensors, tokenizer). Every rank calls it
    before the process group exists, so no group waits on a download and times out: the hub's cache
    lets one process fetch a file while the others wait for it, and make_demo's rename lets one
    process make the demo while the others find it made."""
    if name is None:
        try:
            if not os.path.isdir(DEMO_DIR):
                make_demo(DEMO_DIR)
        except OSError as e:
            why = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e)
            raise UserError(f"cannot create the demo model in {DEMO_DIR} ({why}); set XDG_CACHE_HOME to a "
                            f"writable directory, or pass --model") from None
        return DEMO_DIR
    if name in PRESETS or os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise UserError(f"model {name} is a file: give the checkpoint's directory")
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise UserError(f"model {name}: no such directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    try:
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
    except GatedRepoError:
        raise UserError(f"{name} is gated: accept its license on the hub and log in (`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise UserError(f"model {name}: not a local directory, nor a model on the hub") from None
    except LocalEntryNotFoundError:
        raise UserError(f"cannot download {name}: offline and not in the local cache; "
                        f"download it where there is network, or pass a local directory") from None
    except (HfHubHTTPError, OSError) as e:
        raise UserError(f"cannot download {name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e!r}); "
                        f"try again, or pass a local directory") from None


DEMO_CONFIG = dict(model_type="llama", hidden_size=128, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, head_dim=16, intermediate_size=256, rms_norm_eps=1e-5,
                   rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=2048,
                   bos_token_id=0, eos_token_id=1, torch_dtype="bfloat16")


def make_demo(path: str):
    """A tiny random-weight Llama in HF layout with a BPE tokenizer trained here: enough to run the
    whole system without downloading anything. Written to a temporary directory beside `path`, then
    renamed into place: a process that loses the race to another one finds the demo made, which is
    success, and no temporary directory is left behind either way."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, pre_tokenizers, processors, trainers
    from tokenizers import models as tok_models
    text = ("TokenWeave splits the tokens of a step into two halves and overlaps the communication of one "
            "half with the computation of the other. The quick brown fox jumps over the lazy dog. "
            "Tensor parallel layers end with an all-reduce; fusing it with the residual add and RMSNorm "
            "saves memory traffic. Once upon a time there was a small model with random weights.")
    tok = HFTokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text] * 50, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    hf = DEMO_CONFIG | {"vocab_size": tok.get_vocab_size()}
    # The checkpoint's tensor names and shapes are the model's own loaders', built on the meta device.
    meta = build(llama.Transformer, llama.Config.from_hf(hf), Dist(device=torch.device("meta")), torch.float)
    g = torch.Generator().manual_seed(1234)
    tensors = {name: (torch.ones(s.full) if name.endswith("norm.weight") else   # std 1/sqrt(fan in):
                      torch.randn(s.full, generator=g) / s.full[-1] ** 0.5      # clear winners
                      ).to(torch.bfloat16) for name, s in sorted(meta.loaders().items())}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp", dir=os.path.dirname(path))
    try:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        tok.save(os.path.join(tmp, "tokenizer.json"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf | {"architectures": ["LlamaForCausalLM"]}, f, indent=1)
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump({"bos_token": "<s>", "eos_token": "</s>", "chat_template":
                       "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}assistant:{% endif %}"}, f, indent=1)
        try:
            os.rename(tmp, path)
        except OSError:
            if not os.path.isdir(path):   # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
