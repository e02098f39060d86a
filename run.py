"""Generate text with tensor-parallel TokenWeave inference.

    torchrun --nproc-per-node 4 run.py --model meta-llama/Llama-3.3-70B-Instruct --chat --prompt "Hi"
    torchrun --nproc-per-node 2 run.py          # a tiny random-weight demo model, created once

All prompts are prefilled in one step (where the token split and overlap pay), then decoded
together; every rank ends each step with the same token (rank 0 samples and broadcasts).
"""
import argparse
import importlib
import json
import os
import sys
import time

import torch
import torch.distributed as dist

import weave

MODEL_FILES = {"llama": "llama", "qwen2": "qwen", "mixtral": "mixtral"}   # config.json model_type -> file
DEMO_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tokenweave", "demo-llama-v1")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a local checkpoint directory (HF layout: config.json, *.safetensors, "
                   "tokenizer.json) or a hub id to download; default: the tiny random-weight demo model")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several (all run as one batch)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line (added to --prompt)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the checkpoint's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens "
                   "whose probability reaches this (default 1.0 = all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--weave", choices=["auto", "on", "off"], default="auto", help="split steps in two and overlap "
                   "comm with compute: auto = at or above the tuned token threshold (default), on = every step "
                   "of 2+ tokens, off = never")
    p.add_argument("--comm", choices=["auto", "fused", "nccl", "gloo", "none"], default="auto",
                   help="comm point backend: fused (one kernel: all-reduce + add + RMSNorm, Hopper), nccl "
                   "(all-reduce then add + RMSNorm), gloo (CPU reference), none (no communication: wrong "
                   "results, for timing only); auto = fused where available, else nccl, gloo on CPU")
    p.add_argument("--tuning", help="a tuning table written by `bench.py tune` (default: configs/<gpu>-<model "
                   "type>-h<hidden>-tp<N>.json when it exists, else the analytic wave model)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="default: cuda if available")
    p.add_argument("--json", action="store_true", help="print one JSON line per prompt (prompt, text, token_ids, "
                   "timings) instead of text")
    args = p.parse_args(argv)
    if args.prompts_file:
        with open(args.prompts_file) as f:
            args.prompt += [line.rstrip("\n") for line in f if line.strip()]
    if not args.prompt:
        args.prompt = ["The quick brown fox"] if args.model is None else ["Tell me about tensor parallelism."]
    if any(not s.strip() for s in args.prompt):
        raise ValueError("empty prompt: every --prompt needs some text")
    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ValueError("--temperature must be >= 0 and --top-p in (0, 1]")
    return args


# ----------------------------------------------------------------------------- checkpoint and tokenizer


def resolve_model(name: str | None, d: weave.Dist) -> str:
    """A local directory as is; a hub id downloaded (config, safetensors, tokenizer) by rank 0 first."""
    if name is None:
        first_rank_then_others(d, lambda: os.path.isdir(DEMO_DIR) or make_demo(DEMO_DIR))
        return DEMO_DIR
    if os.path.isdir(name):
        return name
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise FileNotFoundError(f"--model {name}: no such directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    def download(**kw):
        try:
            return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*"], **kw)
        except GatedRepoError:
            raise ValueError(f"{name} is gated: accept its license on the hub and log in (`hf auth login`)") from None
        except RepositoryNotFoundError:
            raise FileNotFoundError(f"--model {name}: not a local directory, nor a model on the hub") from None
        except LocalEntryNotFoundError:
            raise ConnectionError(f"cannot download {name}: offline and not in the local cache; "
                                  f"download it where there is network, or pass a local directory") from None
    first_rank_then_others(d, download)
    return download(local_files_only=True) if d.rank else download()


def first_rank_then_others(d: weave.Dist, fn):
    """Rank 0 runs fn (a download, a build) before the others, which then find it done."""
    if d.rank == 0:
        fn()
    if d.world > 1:
        dist.barrier()


def make_demo(path: str):
    """A tiny random-weight Llama in HF layout with a BPE tokenizer trained here: enough to run the
    whole system without downloading anything. Written to a temporary directory, then renamed."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    import llama
    text = ("TokenWeave splits the tokens of a step into two halves and overlaps the communication of one "
            "half with the computation of the other. The quick brown fox jumps over the lazy dog. "
            "Tensor parallel layers end with an all-reduce; fusing it with the residual add and RMSNorm "
            "saves memory traffic. Once upon a time there was a small model with random weights.")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text] * 50, trainers.BpeTrainer(vocab_size=384, special_tokens=["<s>", "</s>"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    hf = dict(model_type="llama", hidden_size=128, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4, head_dim=16, intermediate_size=256, vocab_size=tok.get_vocab_size(),
              rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=2048,
              bos_token_id=0, eos_token_id=1, torch_dtype="bfloat16")
    g = torch.Generator().manual_seed(1234)
    tensors = {name: torch.ones(shape) if name.endswith("norm.weight") else   # std 1/sqrt(fan in):
               torch.randn(shape, generator=g) / shape[-1] ** 0.5               # logits with clear winners
               for name, shape in hf_shapes(llama.Config.from_hf(hf)).items()}
    tmp = f"{path}.tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    tensors = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
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


def hf_shapes(cfg) -> dict:
    """Tensor name -> shape of a Llama checkpoint in HF layout."""
    H, I, V, q, kv = cfg.hidden, cfg.intermediate, cfg.vocab, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    out = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}"
        out |= {f"{p}.input_layernorm.weight": (H,), f"{p}.post_attention_layernorm.weight": (H,),
                f"{p}.self_attn.q_proj.weight": (q, H), f"{p}.self_attn.k_proj.weight": (kv, H),
                f"{p}.self_attn.v_proj.weight": (kv, H), f"{p}.self_attn.o_proj.weight": (H, q),
                f"{p}.mlp.gate_proj.weight": (I, H), f"{p}.mlp.up_proj.weight": (I, H),
                f"{p}.mlp.down_proj.weight": (H, I)}
    return out


def load_tokenizer(path: str):
    from tokenizers import Tokenizer
    f = os.path.join(path, "tokenizer.json")
    if not os.path.exists(f):
        raise FileNotFoundError(f"no tokenizer.json in {path}: this runner needs a `tokenizers` tokenizer file")
    return Tokenizer.from_file(f)


def read_json(path: str, name: str) -> dict:
    f = os.path.join(path, name)
    if not os.path.exists(f):
        return {}
    with open(f) as fh:
        return json.load(fh)


def encode_prompts(tok, prompts, path: str, chat: bool) -> list:
    if not chat:
        return [tok.encode(p).ids for p in prompts]
    tc = read_json(path, "tokenizer_config.json")
    template = tc.get("chat_template")
    if isinstance(template, list):   # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    if not template:
        raise ValueError(f"--chat: the checkpoint in {path} has no chat template (tokenizer_config.json)")
    import jinja2
    special = lambda v: v.get("content") if isinstance(v, dict) else v
    render = jinja2.Environment().from_string(template).render
    texts = [render(messages=[{"role": "user", "content": p}], add_generation_prompt=True,
                    bos_token=special(tc.get("bos_token")) or "", eos_token=special(tc.get("eos_token")) or "")
             for p in prompts]
    return [tok.encode(t, add_special_tokens=False).ids for t in texts]


# ----------------------------------------------------------------------------- generation


def sample(logits, temperature: float, top_p: float, g: torch.Generator):
    """logits (B, V) -> (B,) next tokens."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    p, idx = probs.sort(dim=-1, descending=True)
    p[(p.cumsum(-1) - p) >= top_p] = 0          # drop tokens once the kept mass reaches top_p
    choice = torch.multinomial(p / p.sum(-1, keepdim=True), 1, generator=g)
    return idx.gather(-1, choice)[:, 0]


def sync(d: weave.Dist) -> float:
    if d.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


@torch.no_grad()
def generate(weaver, prompts_ids, max_new: int, eos: set, args, d: weave.Dist):
    """Prefills all prompts in one step, then decodes them together until EOS or max_new tokens."""
    g = torch.Generator(d.device).manual_seed(args.seed)
    B = len(prompts_ids)
    out = [[] for _ in range(B)]
    t0 = sync(d)
    batch = weave.Batch.make([(i, 0, len(p)) for i, p in enumerate(prompts_ids)],
                             [t for p in prompts_ids for t in p], d.device)
    active = list(range(B))
    step, ttft = 0, None
    while active:
        nxt = weave.broadcast_from_rank0(sample(weaver(batch), args.temperature, args.top_p, g), d).tolist()
        if ttft is None:
            ttft = sync(d) - t0
        step += 1
        for i, t in zip(active, nxt):
            out[i].append(t)
        active = [i for i in active if out[i][-1] not in eos and len(out[i]) < max_new]
        batch = weave.Batch.make([(i, len(prompts_ids[i]) + len(out[i]) - 1, 1) for i in active],
                                 [out[i][-1] for i in active], d.device)
    total = sync(d) - t0
    n_prefill = sum(map(len, prompts_ids))
    n_decode = sum(map(len, out)) - B
    timings = {"ttft_s": ttft, "prefill_tok_s": n_prefill / ttft,
               "decode_tok_s": n_decode / (total - ttft) if n_decode else None, "decode_steps": step - 1}
    return out, timings


def main(argv=None) -> int:
    d = None
    try:
        args = parse_args(argv)
        d = weave.init_distributed(args.device)
        say = print if d.rank == 0 else (lambda *a, **k: None)
        log = (lambda s: print(s, file=sys.stderr, flush=True)) if d.rank == 0 else (lambda s: None)
        t0 = time.perf_counter()
        path = resolve_model(args.model, d)
        if args.model is None:
            log(f"no --model given: using the demo model at {path} (tiny, RANDOM weights: the text is gibberish)")
        hf_cfg = read_json(path, "config.json")
        if not hf_cfg:
            raise FileNotFoundError(f"no config.json in {path}")
        kind = hf_cfg.get("model_type")
        if kind not in MODEL_FILES:
            raise ValueError(f"model_type {kind!r} is not supported; supported: {', '.join(MODEL_FILES)}")
        mod = importlib.import_module(MODEL_FILES[kind])
        cfg = mod.Config.from_hf(hf_cfg)
        gen = read_json(path, "generation_config.json").get("eos_token_id")
        eos = set(cfg.eos_ids) | set(gen if isinstance(gen, list) else [gen] if gen is not None else [])
        tok = load_tokenizer(path)
        prompts_ids = encode_prompts(tok, args.prompt, path, args.chat)
        for i, ids in enumerate(prompts_ids):
            if len(ids) + args.max_new_tokens > cfg.max_positions:
                raise ValueError(f"prompt {i + 1} has {len(ids)} tokens: with --max-new-tokens "
                                 f"{args.max_new_tokens} it exceeds the model's context of {cfg.max_positions}")
        dtype = getattr(torch, cfg.dtype.replace("torch.", "")) if d.device.type == "cuda" else torch.float32
        model = mod.build(mod.Transformer, cfg, d, dtype)
        log(f"loading {path} ({kind}, {cfg.n_layers} layers, TP {d.world}, {dtype}) on {d.device.type}")
        mod.load_checkpoint(model, path, log=log)
        model.allocate_cache(len(prompts_ids), max(map(len, prompts_ids)) + args.max_new_tokens)
        comm = weave.make_comm(args.comm, d, cfg.hidden, sum(map(len, prompts_ids)), dtype)
        tuning = weave.Tuning.load(args.tuning or weave.tuning_path(cfg, d.world))
        weaver = weave.Weaver(model, comm, args.weave, tuning)
        load_s = sync(d) - t0
        log(f"ready in {load_s:.1f}s: comm {comm.name}{'/' + comm.transport if comm.name == 'fused' else ''}, "
            f"weave {args.weave}")
        outs, timings = generate(weaver, prompts_ids, args.max_new_tokens, eos, args, d)
        timings["load_s"] = load_s
        for prompt, ids in zip(args.prompt, outs):
            text = tok.decode([t for t in ids if t not in eos])
            if args.json:
                say(json.dumps({"prompt": prompt, "text": text, "token_ids": ids, **timings}))
            else:
                say(f"--- {prompt}\n{text}\n")
        if not args.json:
            dec = timings["decode_tok_s"]
            say(f"load {load_s:.1f}s | time to first token {timings['ttft_s'] * 1e3:.1f} ms | prefill "
                f"{timings['prefill_tok_s']:.0f} tok/s | decode {f'{dec:.1f} tok/s' if dec else '-'} "
                f"({len(outs)} sequences, TP {d.world}, comm {comm.name}, weave {args.weave})")
        return 0
    except (ValueError, FileNotFoundError, ConnectionError) as e:
        if d is None or d.rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
