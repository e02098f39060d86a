"""run.py's command line: the same greedy tokens through every path (weave on and off, TP 1 and 2,
transformers' own for each family); every bad input gets one clear `error:` line that names the flag
or file and says what to do, nothing is silently ignored or silently different, no Traceback, and
nothing crashes after success. In-process through run.main(argv) on the demo model (made once per
module); torchrun only where ranks matter."""
import contextlib
import gc
import io
import json
import multiprocessing
import os
import shutil
import subprocess
import sys

import pytest
import torch

import comm
import engine
import group
import models
import run
from conftest import free_port, hf_family

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def demo_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "demo"
    models.make_demo(str(path))
    return path


@pytest.fixture(autouse=True)
def demo(demo_path, monkeypatch):
    """models.resolve(None) finds the module's demo; no torchrun variables leak in from outside."""
    monkeypatch.setattr(models, "DEMO_DIR", str(demo_path))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return demo_path


@pytest.fixture
def cli(capsys):
    """run.main on the CPU: (exit code, stdout, stderr); stderr never holds a Traceback."""
    def call(*args):
        rc = run.main(["--device", "cpu", *map(str, args)])
        out, err = capsys.readouterr()
        assert "Traceback" not in err and "Traceback" not in out, err
        return rc, out, err
    return call


def error_line(err: str) -> str:
    """The one `error:` line of stderr (and it is the only one)."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def fails(cli, *args, code=1):
    rc, out, err = cli(*args)
    assert rc == code, (rc, err)
    assert out == "", out
    return error_line(err)


def copy_demo(demo, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(demo, path)
    return path


# ----------------------------------------------------------------------------- --help


def test_help_says_tp_size_default_prompt_and_seed(capsys):
    with pytest.raises(SystemExit) as e:
        run.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())   # argparse wraps lines
    assert "--nproc-per-node" in text and "tensor-parallel size" in text
    assert f"no prompt is given: {run.DEFAULT_PROMPT['demo']!r} (demo)" in text
    assert "seed of the sampler; matters only with --temperature > 0" in text


def test_help_printed_by_rank_0_only(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as e:
        run.main(["--help"])
    assert e.value.code == 0 and capsys.readouterr() == ("", "")


# ----------------------------------------------------------------------------- the checkpoint


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors(cli, demo, tmp_path, damage):
    path = copy_demo(demo, tmp_path)
    f = path / "model.safetensors"
    if damage == "truncated":
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    else:
        f.write_bytes(b"this is not a safetensors file" * 100)
    line = fails(cli, "--model", path)
    assert str(f) in line and "download it again" in line, line


def test_model_no_such_directory(cli, tmp_path):
    line = fails(cli, "--model", tmp_path / "no" / "such" / "dir")
    assert "no such directory" in line and str(tmp_path / "no") in line


def test_unknown_model_type(cli, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    line = fails(cli, "--model", tmp_path)
    assert "model_type 'gpt2' is not supported; supported: llama" in line


@pytest.mark.parametrize("config,says", [
    (None, "no config.json in {d}: --model needs a checkpoint directory"),
    ("{oops", "{d}/config.json is not valid JSON"),
    ("[1]", "{d}/config.json is not a model config"),
    ('{"model_type": "llama"}', "{d}/config.json has no 'hidden_size': it is not a complete llama config"),
    ('{"model_type": "qwen2", "hidden_size": 64}', "{d}/config.json has no 'num_hidden_layers'"),
])
def test_bad_config_json(cli, tmp_path, config, says):
    if config is not None:
        (tmp_path / "config.json").write_text(config)
    assert says.format(d=tmp_path) in fails(cli, "--model", tmp_path)


def edit_config(path, **changes):
    f = path / "config.json"
    f.write_text(json.dumps(json.loads(f.read_text()) | changes))


@pytest.mark.parametrize("changes,says", [
    (dict(num_hidden_layers=2), "has 18 tensors the model does not use, e.g. model.layers.2."),
    (dict(num_key_value_heads=2), "tensor model.layers.0.self_attn.k_proj.weight in {f}: expected shape (32, 128), "
                                  "the checkpoint has (64, 128); config.json does not match the weights"),
    (dict(num_attention_heads=4, head_dim=16), "o_proj.weight in {f}: expected shape (128, 64), the checkpoint has (128, 128)"),
    (dict(intermediate_size=128), "down_proj.weight in {f}: expected shape (128, 128), the checkpoint has (128, 256)"),
])
def test_config_smaller_than_checkpoint(cli, demo, tmp_path, changes, says):
    """A config.json that describes a smaller model than its tensors: refused, never run on a slice."""
    path = copy_demo(demo, tmp_path)
    edit_config(path, **changes)
    assert says.format(f=path / "model.safetensors") in fails(cli, "--model", path)


def test_tokenizer_beyond_the_vocabulary(cli, demo, tmp_path):
    path = copy_demo(demo, tmp_path)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    edit_config(path, vocab_size=vocab - 10)
    line = fails(cli, "--model", path)
    assert f"has token ids up to {vocab - 1}, but the model has {vocab - 10} embedding rows" in line, line
    assert "loading" not in line


@pytest.mark.parametrize("key,value,says", [
    ("hidden_size", "128", "sets 'hidden_size' to '128': it must be an integer of at least 1"),
    ("num_hidden_layers", 0, "sets 'num_hidden_layers' to 0: it must be an integer of at least 1"),
    ("rms_norm_eps", -1, "sets 'rms_norm_eps' to -1: it must be a positive number"),
    ("tie_word_embeddings", "no", "sets 'tie_word_embeddings' to 'no': it must be true or false"),
    ("eos_token_id", [1, "x"], "sets 'eos_token_id' to 'x'"),
])
def test_config_values_of_the_wrong_type(cli, demo, tmp_path, key, value, says):
    path = copy_demo(demo, tmp_path)
    edit_config(path, **{key: value})
    assert f"{path / 'config.json'} {says}" in fails(cli, "--model", path)


def test_corrupt_tokenizer(cli, demo, tmp_path):
    path = copy_demo(demo, tmp_path)
    (path / "tokenizer.json").write_text('{"truncated": ')
    line = fails(cli, "--model", path)
    assert f"{path / 'tokenizer.json'} is not a readable tokenizer" in line and "download it again" in line
    (path / "tokenizer.json").unlink()
    assert f"no tokenizer.json in {path}" in fails(cli, "--model", path)


def test_tokenizer_file_padding_and_truncation_are_ignored(demo, tmp_path):
    """A tokenizer.json may turn padding or truncation on: the prompts, encoded in one batch, keep
    their own lengths and every token (a prompt too long for the model is the engine's to refuse)."""
    from tokenizers import Tokenizer as HFTokenizer
    path = copy_demo(demo, tmp_path)
    prompts = ["The quick brown fox", "jumps", "over the lazy dog " * 20]
    want = models.Tokenizer(str(path), 10**6).encode(prompts)
    tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
    tok.enable_padding(pad_id=0)
    tok.enable_truncation(max_length=4)
    tok.save(str(path / "tokenizer.json"))
    assert models.Tokenizer(str(path), 10**6).encode(prompts) == want
    assert len(set(map(len, want))) == 3 and min(map(len, want)) < 4 < max(map(len, want))


def test_broken_chat_template(cli, demo, tmp_path):
    path = copy_demo(demo, tmp_path)
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for %}"}))
    line = fails(cli, "--model", path, "--chat")
    assert f"--chat: the chat template in {path / 'tokenizer_config.json'} does not render" in line, line
    (path / "tokenizer_config.json").write_text("{}")
    assert "--chat: the checkpoint in" in fails(cli, "--model", path, "--chat")


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
          " + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# The same without whitespace control: transformers' trim_blocks / lstrip_blocks make it render alike.
CHATML_LOOSE = ("{% for message in messages %}\n<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                "  {% endfor %}\n{% if add_generation_prompt %}\n<|im_start|>assistant\n{% endif %}\n")
LLAMA3 = ("{{- bos_token }}\n{%- for message in messages %}\n    {{- '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}\n{%- endfor %}\n"
          "{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
          "{%- endif %}\n")
MIXTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] "
           "== 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
           "roles are supported!') }}{% endif %}{% endfor %}")


@pytest.mark.parametrize("template", [CHATML, CHATML_LOOSE, LLAMA3, MIXTRAL], ids=["chatml", "chatml-loose", "llama3",
                                                                                    "mixtral"])
def test_chat_template_renders_as_transformers_does(demo, tmp_path, template):
    """--chat gives the text and the token ids of transformers' apply_chat_template."""
    from transformers import PreTrainedTokenizerFast
    path = copy_demo(demo, tmp_path)
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                            "chat_template": template}))
    ours = models.Tokenizer(str(path), 10**6)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), bos_token="<s>", eos_token="</s>")
    for prompt in ("The quick brown fox", "  spaced out\nlines  "):
        messages = [{"role": "user", "content": prompt}]
        text = hf.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)
        ids = hf.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert ours.chat_template()(prompt) == text
        assert ours.encode([prompt], chat=True) == [list(ids)]


@pytest.mark.parametrize("template,says", [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError: access to attribute '__class__'"),
    ("{{ raise_exception('no system messages here') }}", "TemplateError: no system messages here"),
])
def test_chat_template_outside_the_sandbox_or_raising(cli, demo, tmp_path, template, says):
    path = copy_demo(demo, tmp_path)
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    line = fails(cli, "--model", path, "--chat")
    assert "--chat: the chat template in" in line and says in line, line


def test_demo_cache_not_writable(cli, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(models, "DEMO_DIR", str(tmp_path / "file" / "tokenweave" / "demo"))
    line = fails(cli)
    assert "demo model" in line and "XDG_CACHE_HOME" in line and "--model" in line


# ----------------------------------------------------------------------------- prompts


def test_prompts_file_is_a_directory(cli, tmp_path):
    line = fails(cli, "--prompts-file", tmp_path, code=2)
    assert f"--prompts-file {tmp_path} is a directory" in line


def test_prompts_file_missing(cli, tmp_path):
    line = fails(cli, "--prompts-file", tmp_path / "nope.txt", code=2)
    assert f"--prompts-file {tmp_path / 'nope.txt'} does not exist" in line


def test_prompts_file_under_a_file(cli, tmp_path):
    (tmp_path / "a.txt").write_text("hi\n")
    line = fails(cli, "--prompts-file", tmp_path / "a.txt" / "b.txt", code=2)
    assert f"--prompts-file {tmp_path / 'a.txt' / 'b.txt'}" in line


def test_prompts_file_not_utf8(cli, tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(b"\xff\xfe\x00bad")
    line = fails(cli, "--prompts-file", f, code=2)
    assert f"--prompts-file {f} is not UTF-8 text" in line and "save it as UTF-8" in line


def test_prompts_file_only_blank_lines(cli, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\n   \n\t\n\n")
    line = fails(cli, "--prompts-file", f, code=2)
    assert f"--prompts-file {f} has no prompts" in line and "one prompt per line" in line


def test_prompts_from_stdin(cli, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("\ufeffThe quick brown fox\n\nOnce upon\n".encode())))
    rc, out, _ = cli("--prompts-file", "-", "--json", "--max-new-tokens", 2)
    assert rc == 0
    got = sorted((r["line"], r["prompt"]) for r in map(json.loads, out.splitlines()))
    assert got == [(1, "The quick brown fox"), (3, "Once upon")]


def test_json_index_and_line(cli, tmp_path):
    """index: the place among all prompts (--prompt ones first); line: the line in --prompts-file."""
    f = tmp_path / "p.txt"
    f.write_text("\nfirst\n\n\nsecond\n")
    rc, out, _ = cli("--prompt", "The quick", "--prompts-file", f, "--json", "--max-new-tokens", 2)
    assert rc == 0
    rows = sorted((r["index"], r.get("line"), r["prompt"]) for r in map(json.loads, out.splitlines()))
    assert rows == [(0, None, "The quick"), (1, 2, "first"), (2, 5, "second")]


def test_prompts_file_utf8_bom_and_crlf(cli, tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes("\ufeffThe quick brown fox\r\n\r\nOnce upon a time\r\n".encode())
    rc, out, _ = cli("--prompts-file", f, "--json", "--max-new-tokens", 2)
    assert rc == 0
    assert sorted(json.loads(line)["prompt"] for line in out.splitlines()) == ["Once upon a time",
                                                                               "The quick brown fox"]


def test_empty_prompt(cli):
    assert "empty prompt" in fails(cli, "--prompt", " ", code=2)


def test_prompt_longer_than_context_fails_alone(cli):
    long = "fox " * 3000
    rc, out, err = cli("--prompt", "The quick brown fox", "--prompt", long, "--prompt", "Once upon a time",
                       "--max-new-tokens", 4)
    assert rc == 1
    blocks = out.split("--- ")[1:]
    assert len(blocks) == 3 and "error:" not in blocks[0] and "error:" not in blocks[2], out
    assert "error: the prompt has" in blocks[1] and "exceeds the model's context of 2048" in blocks[1]
    assert "3/3 prompts done (1 failed)" in err
    assert "error: prompt 2: the prompt has" in err      # on stderr too: `> out.txt` still shows it

    rc, out, _ = cli("--prompt", "The quick brown fox", "--prompt", long, "--max-new-tokens", 4, "--json")
    assert rc == 1
    lines = {r["index"]: r for r in map(json.loads, out.splitlines())}
    assert set(lines) == {0, 1} and "error" not in lines[0] and len(lines[0]["token_ids"]) == 4
    assert "exceeds the model's context of 2048" in lines[1]["error"] and lines[1]["token_ids"] == []


def test_single_prompt_too_long_fails_before_loading(cli):
    line = fails(cli, "--prompt", "fox " * 3000, "--max-new-tokens", 4)
    assert "the prompt has 6002 tokens: it exceeds the model's context of 2048 by itself; shorten it" in line
    rc, out, err = cli("--prompt", "fox " * 3000)
    assert "loading" not in err and out == ""


def test_max_new_tokens_too_large_names_the_largest_that_fits(cli):
    """The prompt is fine; --max-new-tokens is what does not fit: the message says so, with the
    largest value that does (the demo's context is 2048; "The quick brown fox" is 11 tokens)."""
    line = fails(cli, "--prompt", "The quick brown fox", "--max-new-tokens", 100000)
    assert "--max-new-tokens 100000 does not fit the model's context of 2048 with the prompt (11 tokens); " \
           "the largest that fits is 2037" in line, line


# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize("args,says", [
    (["--temprature", "1"], "unknown option --temprature; see python run.py --help"),
    (["hello"], "unexpected argument 'hello': give a prompt with --prompt 'hello' (see python run.py --help)"),
    (["--max-new-tokens", "x"], "argument --max-new-tokens: invalid max-new-tokens value: 'x' (see python run.py --help)"),
])
def test_bad_command_line_points_to_help(cli, args, says):
    assert says in fails(cli, *args, code=2)


def test_graphs_on_without_cuda_fails_before_loading(cli, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, out, err = cli("--graphs", "on", "--device", "auto")
    assert rc == 2 and "--graphs on needs CUDA, and this run is on the CPU" in error_line(err)
    assert "loading" not in err and "demo" not in err


def test_step_budget_too_large(cli):
    """A budget no step can use is refused with the most a step can hold; one that does not fit in
    memory, with the largest that does."""
    line = fails(cli, "--max-step-tokens", 10**7)
    assert "--max-step-tokens 10000000 is more than a step can ever hold: --max-seqs 256 sequences of the model's " \
           "context (2048) bring at most 524288; lower it" in line, line
    line = fails(cli, "--max-step-tokens", 10**9, "--max-seqs", 10**6)
    assert "--max-step-tokens 1000000000 needs" in line and "GiB of step buffers" in line, line
    largest = int(line.rsplit(" ", 1)[1])
    assert "the largest that fits is" in line and 0 < largest < 10**9


def test_memory_too_small_names_memory(cli):
    line = fails(cli, "--memory", "1e-9")
    assert "needs 2.6 MiB for its weights (float32) on each of 1 rank, and this host has" in line, line
    assert "bytes to spare (at --memory 1e-09); raise --memory" in line, line


def test_preset_has_no_tokenizer(cli):
    line = fails(cli, "--model", "llama-3.3-70b", "--prompt", "x")
    assert "--model llama-3.3-70b is a preset" in line and "bench.py" in line, line


def test_comm_none_is_refused(cli):
    line = fails(cli, "--comm", "none", code=2)
    assert "--comm none removes the communication" in line and "benchmark mode" in line


def test_prompts_from_a_terminal_say_how_to_end(cli, monkeypatch):
    class Terminal(io.TextIOWrapper):
        def isatty(self):
            return True
    monkeypatch.setattr(sys, "stdin", Terminal(io.BytesIO(b"The quick\n")))
    rc, out, err = cli("--prompts-file", "-", "--json", "--max-new-tokens", 2)
    assert rc == 0 and "one per line; end with Ctrl-D" in err


def test_stdout_holds_results_only(cli):
    """Text mode: stdout is the generated text under its header; the statistics go to stderr. JSON:
    one line per prompt with why it ended."""
    rc, out, err = cli("--prompt", "The quick brown fox", "--max-new-tokens", 3)
    assert rc == 0 and out.startswith("--- The quick brown fox\n") and "tok/s" not in out and "load" not in out
    assert "time to first token" in err
    rc, out, err = cli("--prompt", "The quick brown fox", "--prompt", "Once", "--max-new-tokens", 3, "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert rc == 0 and len(rows) == 2 and all(r["finish_reason"] == "length" for r in rows), rows


def test_many_running_sequences_on_cpu_fit_the_host(cli):
    """A large --max-seqs on the CPU: the cache holds what the prompts can use, never more."""
    rc, out, err = cli("--max-seqs", 100000, "--max-step-tokens", 100000, "--max-new-tokens", 2, "--prompt", "The quick")
    assert rc == 0 and "KV cache 7 positions (0.00 GiB) for up to 100000 sequences" in err   # 6 prompt tokens + 1


def test_auto_comm_falls_back_to_nccl_where_fused_cannot_run(monkeypatch):
    monkeypatch.setattr(comm, "fused_available", lambda d: (True, ""))
    d = group.Dist(0, 2, torch.device("cuda", 0))
    assert comm.check_comm("auto", d, torch.bfloat16, 4096) == "fused"
    assert comm.check_comm("auto", d, torch.float16, 4096) == "nccl"
    assert comm.check_comm("auto", d, torch.float32, 4096) == "nccl"
    with pytest.raises(group.UserError, match="comm fused is not available here: the fused kernel runs bf16 models, "
                                             "this one is float16; use nccl"):
        comm.check_comm("fused", d, torch.float16, 4096)


def test_max_new_tokens_zero(cli):
    line = fails(cli, "--max-new-tokens", 0, code=2)
    assert "--max-new-tokens" in line and "must be at least 1" in line


@pytest.mark.parametrize("flag,value,says", [
    ("--temperature", "-1", "--temperature must be >= 0"),
    ("--temperature", "nan", "--temperature must be >= 0"),
    ("--top-p", "0", "--top-p must be in (0, 1]"),
    ("--top-p", "1.5", "--top-p must be in (0, 1]"),
])
def test_sampling_flags(cli, flag, value, says):
    line = fails(cli, flag, value, code=2)
    assert says in line and value in line, line


def test_tuning_missing(cli, tmp_path):
    line = fails(cli, "--tuning", tmp_path / "t.json", code=2)
    assert f"--tuning {tmp_path / 't.json'} does not exist" in line and "bench.py tune" in line
    assert f"--tuning {tmp_path} is a directory" in fails(cli, "--tuning", tmp_path, code=2)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"threshold": "big"}'])
def test_tuning_not_a_table(cli, tmp_path, content):
    f = tmp_path / "t.json"
    f.write_text(content)
    line = fails(cli, "--tuning", f)
    assert f"tuning file {f} is not a table written by bench.py tune" in line and "again" in line


@pytest.mark.parametrize("backend", ["fused", "nccl", "gloo"])
def test_comm_needs_ranks_before_loading(cli, backend):
    rc, out, err = cli("--comm", backend)
    assert rc == 1 and out == ""
    line = error_line(err)
    assert f"comm {backend} needs 2 or more ranks" in line and "(use auto)" in line
    assert "loading" not in err and "no --model given" not in err   # failed before the checkpoint
    if backend != "gloo":   # with ranks, the next thing that can be wrong is the device
        with pytest.raises(ValueError, match="needs CUDA GPUs; on the CPU use gloo"):
            comm.check_comm(backend, group.Dist(world=2))


def test_more_ranks_than_gpus(cli, monkeypatch):
    """torchrun started more processes on this node than there are GPUs: every rank knows, rank 0
    says so (before, only the ranks without a GPU failed, silently, and rank 0 waited for them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    line = fails(cli, "--device", "auto")
    assert "2 processes" in line and "1 GPU is visible" in line and "--nproc-per-node 1" in line, line
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert "--device cuda: no CUDA GPU is visible; use --device cpu" in fails(cli, "--device", "cuda")


@pytest.mark.parametrize("where", ["load", "generate"])
def test_ctrl_c(cli, demo, monkeypatch, where):
    def interrupt(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(*((models, "load") if where == "load" else (engine.Engine, "generate")), interrupt)
    rc, out, err = cli("--model", demo)
    assert rc == 130 and out == ""
    assert [line for line in err.splitlines() if line and not line.startswith(("loading", "loaded", "ready"))] == [
        "interrupted"], err


def test_stdout_closed_early(cli, monkeypatch):
    """`run.py --json | head -1`: the reader leaves; one line says so, no Traceback."""
    class Closed:
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass
    monkeypatch.setattr(sys, "stdout", Closed())
    line = fails(cli, "--prompt", "The quick brown fox", "--json", "--max-new-tokens", 2)
    assert line == "error: stdout was closed before every result was written (broken pipe)"


@pytest.mark.parametrize("how", ["success", "ctrl-c"])
def test_run_freed_before_process_group_destroyed(cli, demo, monkeypatch, how):
    """A rare abort at exit: the engine (its CUDA graphs captured the comm's collectives), the comm
    buffers and the model must be gone before the process group is destroyed, also after an error;
    and with every rank done, destroy follows a barrier."""
    import llama
    import torch.distributed as dist
    tracked = (engine.Engine, comm.Comm, llama.Transformer)
    calls = []

    def destroy():
        live = [type(o).__name__ for o in gc.get_objects() if issubclass(type(o), tracked)]
        calls.append(("destroy", live))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", destroy)
    if how == "ctrl-c":
        def interrupt(self, *a, **kw):
            raise KeyboardInterrupt
            yield
        monkeypatch.setattr(engine.Engine, "generate", interrupt)
    rc, _, _ = cli("--model", demo, "--prompt", "The quick brown fox", "--max-new-tokens", 2)
    assert rc == (0 if how == "success" else 130)
    assert calls == [("destroy", [])]


# ----------------------------------------------------------------------------- output


def test_streamed_prompt_has_one_header(cli, demo, tmp_path):
    """One prompt streams under a single header, also when its first tokens decode to part of a
    UTF-8 character (random weights often do) and when sampled with the chat template."""
    for extra in ([], ["--chat", "--temperature", "0.8", "--top-p", "0.9", "--seed", "3"]):
        rc, out, _ = cli("--prompt", "The quick brown fox", "--max-new-tokens", 24, *extra)
        assert rc == 0 and out.count("--- The quick brown fox") == 1 and out.startswith("--- "), out


def test_sampled_text_does_not_depend_on_batching(cli, tmp_path):
    """--seed fixes each prompt's sampled text, whatever runs beside it."""
    f = tmp_path / "p.txt"
    f.write_text("The quick brown fox\nOnce upon a time\nTensor parallel\nsaves memory traffic\n")
    texts = []
    for flags in (["--max-seqs", 1], ["--max-seqs", 4, "--max-step-tokens", 8], ["--max-seqs", 2]):
        rc, out, _ = cli("--prompts-file", f, "--json", "--temperature", "1.0", "--seed", 5, "--max-new-tokens", 12, *flags)
        assert rc == 0
        texts.append(sorted((r["index"], r["token_ids"]) for r in map(json.loads, out.splitlines())))
    assert texts[0] == texts[1] == texts[2]


def make_demo_racing(path, start):
    start.wait()
    models.make_demo(path)


def test_concurrent_first_runs_make_one_demo(tmp_path):
    """Four processes make the demo at once: all succeed, one demo is there, no temporary left.
    Forked with torch on one thread: a fork of a process whose OpenMP pool runs several can hang."""
    path = str(tmp_path / "cache" / "demo")
    ctx, threads = multiprocessing.get_context("fork"), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = ctx.Event()
        procs = [ctx.Process(target=make_demo_racing, args=(path, start)) for _ in range(4)]
        for p in procs:
            p.start()
        start.set()
        for p in procs:
            p.join(120)
    finally:
        torch.set_num_threads(threads)
    assert [p.exitcode for p in procs] == [0] * 4
    assert os.listdir(tmp_path / "cache") == ["demo"]
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


# ----------------------------------------------------------------------------- the same tokens everywhere

PROMPTS = ["The quick brown fox", "Once upon a time there was"]
DEMO_IN_CACHE = os.path.relpath(models.DEMO_DIR, os.path.dirname(os.path.dirname(models.DEMO_DIR)))


def cli_tokens(weave_mode, nproc=1, cache=None, device="cpu", model=None, backend="auto"):
    """The greedy tokens (12 at most) of PROMPTS from `run.py --json`: run.main in this process at
    TP 1, torchrun at TP > 1 with XDG_CACHE_HOME=cache. No model: the demo (models.DEMO_DIR here)."""
    args = ["--device", device, "--json", "--max-new-tokens", "12", "--weave", weave_mode, "--comm", backend,
            *[a for p in PROMPTS for a in ("--prompt", p)], *(["--model", str(model)] if model else [])]
    if nproc == 1:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert run.main(args) == 0      # why not: the captured stderr
        stdout = out.getvalue()
    else:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", XDG_CACHE_HOME=str(cache))
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-port",
                            str(free_port()), os.path.join(HERE, "run.py"), *args], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        stdout = r.stdout
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 2 and all(len(x["token_ids"]) >= 1 and x["ttft_s"] > 0 for x in lines)
    return [x["token_ids"] for x in lines]


@pytest.fixture
def demo_cache(tmp_path, monkeypatch):
    """An empty cache directory where the first run makes the demo model: run.main looks in
    models.DEMO_DIR, torchrun's processes through XDG_CACHE_HOME."""
    monkeypatch.setattr(models, "DEMO_DIR", str(tmp_path / DEMO_IN_CACHE))
    return tmp_path


def test_demo_same_tokens_weave_on_and_off(demo_cache):
    """The demo model, made by the first run, gives the same greedy tokens at TP 1 with weave off and
    on. At TP 2 (torchrun): test_json_under_torchrun; the logits at TP 2 and 4: test_weave."""
    want = cli_tokens("off")
    assert os.path.exists(os.path.join(models.DEMO_DIR, "tokenizer.json"))
    assert cli_tokens("on") == want


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_demo_same_tokens_cuda(demo_cache):
    want = cli_tokens("off", device="cuda")
    for nproc, mode, backend in [(2, "on", "nccl"), (2, "off", "nccl"), (2, "on", "fused"), (2, "off", "fused")]:
        assert cli_tokens(mode, nproc, demo_cache, "cuda", backend=backend) == want, (nproc, mode, backend)


def hf_greedy(hf, ids, n, eos):
    """transformers' greedy continuation of ids: n tokens, or fewer ending with an EOS id."""
    out = []
    with torch.no_grad():
        while len(out) < n and not (out and out[-1] in eos):
            out.append(hf(torch.tensor([ids + out])).logits[0, -1].argmax().item())
    return out


@pytest.mark.parametrize("family", ["qwen2", "mixtral"])
def test_family_cli_greedy_matches_transformers(family, demo, tmp_path):
    """run.py (run.main in this process) on a tiny checkpoint with the demo's tokenizer: with weave off
    and on, the greedy tokens of transformers' model. TP > 1: test_weave.test_tp_gloo_matches_tp1."""
    from tokenizers import Tokenizer
    vocab = json.loads((demo / "config.json").read_text())["vocab_size"]
    path, hf = hf_family(tmp_path / "ckpt", family, vocab_size=vocab, bos_token_id=0, eos_token_id=1)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo / name, path)
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    want = [hf_greedy(hf, tok.encode(p).ids, 12, {1}) for p in PROMPTS]
    assert cli_tokens("off", model=path) == want
    assert cli_tokens("on", model=path) == want


# ----------------------------------------------------------------------------- torchrun


def torchrun(*args, nproc=2, env=None, launcher=(), stdin=""):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *launcher,
           os.path.join(HERE, "run.py"), "--device", "cpu", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, input=stdin)


def test_error_printed_once_across_ranks(tmp_path):
    """Both ranks see the bad argument; rank 0 alone prints it. --tee keeps a copy of each rank's
    output, so the ranks' own stderr can be told from torchrun's: on any nonzero exit the launcher
    prints its own ChildFailedError report, Traceback included, which no script can avoid."""
    r = torchrun("--max-new-tokens", "0", launcher=["--tee", "3", "--log-dir", str(tmp_path)])
    assert r.returncode != 0
    shown = [line for line in r.stderr.splitlines() if "error:" in line]
    says = "error: argument --max-new-tokens: must be at least 1, got 0 (see python run.py --help)"
    assert shown == [f"[default0]:{says}"], r.stderr
    logs = {p.parent.name: p.read_text() for p in tmp_path.rglob("stderr.log")}
    assert logs == {"0": f"{says}\n", "1": ""}, logs


def test_download_failure_before_the_group_one_line(tmp_path):
    """A hub id that cannot be downloaded (offline, not cached): every rank fails before the process
    group exists, so no rank waits at a barrier for another; rank 0 alone says why."""
    r = torchrun("--model", "no-such-org/no-such-model", launcher=["--tee", "3", "--log-dir", str(tmp_path / "logs")],
                 env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode != 0
    logs = {p.parent.name: p.read_text() for p in (tmp_path / "logs").rglob("stderr.log")}
    says = "error: cannot download no-such-org/no-such-model: offline and not in the local cache"
    assert set(logs) == {"0", "1"} and logs["0"].startswith(says) and logs["0"].count("\n") == 1, logs
    assert logs["1"] == "", logs


def test_sigterm_to_one_rank_ends_the_run_with_one_line(demo, tmp_path):
    """TP 2 on the CPU, rank 1 stopped with SIGTERM mid-run: one line says which rank, the launch
    exits non-zero, and no worker is left behind."""
    import signal
    import time
    prompts = tmp_path / "p.txt"
    prompts.write_text("The quick brown fox\n" * 64)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           os.path.join(HERE, "run.py"), "--device", "cpu", "--model", str(demo), "--prompts-file", str(prompts),
           "--max-new-tokens", "1500", "--json"]
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in launcher.stderr:            # rank 0 says when it is ready
        lines.append(line)
        if line.startswith("ready in"):
            break
    workers = {}
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                ranks = [v for v in f.read().split(b"\0") if v.startswith(b"RANK=")]
        except (OSError, ValueError):
            continue
        if ppid == launcher.pid and ranks:
            workers[int(ranks[0][5:])] = int(pid)
    assert set(workers) == {0, 1}, (workers, "".join(lines))
    os.kill(workers[1], signal.SIGTERM)     # in generation
    rest = launcher.stderr.read()
    assert launcher.wait(timeout=120) != 0
    errors = [line.strip() for line in lines + rest.splitlines() if line.strip().startswith("error:")]
    assert errors == ["error: rank 1 of 2 was stopped (SIGTERM); the other ranks stop with it"], rest[-3000:]
    time.sleep(0.5)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers.values()), "a worker outlived the launch"


def test_json_under_torchrun(demo):
    """The CPU multi-rank run end to end: TP 2 under torchrun, weave on, prompts from the command line
    and from stdin (rank 0 reads them and broadcasts them): stdout is JSON lines only, and the greedy
    tokens are TP 1's."""
    r = torchrun("--json", "--max-new-tokens", "12", "--weave", "on", "--model", str(demo), "--prompt", PROMPTS[0],
                 "--prompts-file", "-", stdin=PROMPTS[1] + "\n")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    lines = sorted((json.loads(line) for line in r.stdout.splitlines()), key=lambda x: x["index"])
    assert [x["index"] for x in lines] == [0, 1]
    assert all({"index", "prompt", "text", "token_ids", "ttft_s"} <= set(x) and x["ttft_s"] > 0 for x in lines)
    assert [x["token_ids"] for x in lines] == cli_tokens("off", model=demo)


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_same_tokens_and_streaming(capsys):
    """On one GPU: decode from CUDA graphs gives the tokens of eager decode, for several prompts at
    once (JSON) and for one prompt streamed as text."""
    def tokens(*args):
        assert run.main(["--device", "cuda", "--json", "--max-new-tokens", "24", *args]) == 0
        return [json.loads(line)["token_ids"] for line in capsys.readouterr().out.splitlines()]
    prompts = ["--prompt", "The quick brown fox", "--prompt", "Once upon a time there was", "--prompt", "Tensor"]
    assert tokens(*prompts, "--graphs", "on") == tokens(*prompts, "--graphs", "off")
    assert run.main(["--device", "cuda", "--max-new-tokens", "24", "--graphs", "on"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("--- The quick brown fox\n") and "time to first token" in err


def test_bench_decode_on_cpu(demo, capsys):
    """bench.py decode runs on the CPU (eager) on the demo: each figure has a step alone and a step
    of a pipelined run, as the engine runs them (the next step enqueued before the last one's tokens
    are read, its tokens carried over on the device)."""
    import bench
    assert bench.main(["decode", "--model", str(demo), "--batches", "1,3", "--contexts", "16", "--iters", "2"]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["batch"] for r in doc["rows"]] == [1, 3]
    for row in doc["rows"]:
        assert row["eager"]["median"] > 0 and row["eager"]["pipelined"]["median"] > 0


def test_bench_model_speedup_pairs_its_rounds(demo, capsys):
    """bench.py model's speedup is the median of the rounds' base / mode ratios (each round runs every
    mode once), not a ratio of medians: here those disagree (0.5 against 1.0). A median of an even
    count is the mean of the middle two, so that ratios lean neither way."""
    import bench
    up = bench.paired({"tp1": [10.0, 10.0, 30.0], "tp1-split": [20.0, 5.0, 30.0], "lost": None}, "tp1")
    assert up == {"tp1-split": 1.0, "lost": None}
    assert bench.paired({"tp1": None, "tp1-split": [1.0]}, "tp1") == {"tp1-split": None}
    assert bench.stats([0.9, 1.0, 1.1, 1.2])["median"] == pytest.approx(1.05)   # even counts: the middle two
    assert bench.main(["model", "--model", str(demo), "--tokens", "24", "--seqs", "1,2", "--iters", "2",
                       "--modes", "tp1,tp1-split"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert [(r["seqs"], r["split"] > 0, set(r["speedup"])) for r in rows] == [(1, True, {"tp1-split"}),
                                                                             (2, True, {"tp1-split"})]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bench_model_replays_every_mode_in_rounds(demo, capsys):
    """bench.py model --graph --profile on one GPU: every mode's step is captured (the graphs share a
    pool) and replayed in rounds, each with its GPU time and its paired speedup; one replay and one
    eager step are profiled by kernel class, and the split's has the GEMMs of both halves."""
    import bench
    modes = ["tp1", "tp1-split", "tp1-split-inline"]
    assert bench.main(["model", "--model", str(demo), "--tokens", "40", "--seqs", "1", "--iters", "3",
                       "--modes", ",".join(modes), "--graph", "--profile"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"][0]
    assert all(row["graph"][m] > 0 for m in modes), row["graph"]
    assert set(row["graph_speedup"]) == set(modes[1:]) and all(v > 0 for v in row["graph_speedup"].values())
    for prof in (row["profile"], row["graph_profile"]):
        assert set(prof) == set(modes) and all(p["span_ms"] > 0 for p in prof.values())
        assert prof["tp1-split"]["gemm"]["kernels"] > prof["tp1"]["gemm"]["kernels"]


def test_bench_checkpoint_runs(demo, tmp_path, monkeypatch, capsys):
    """bench.py checkpoint (what gpu_check.sh e2e times run.py on) writes a checkpoint of a preset's
    shape, the demo's tokenizer and a prompts file that run.py loads and runs, every prompt."""
    import bench
    vocab = json.loads((demo / "config.json").read_text())["vocab_size"]
    monkeypatch.setitem(models.PRESETS, "tiny", models.LLAMA_3_70B | dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=vocab, max_position_embeddings=256))
    out = tmp_path / "ckpt"
    assert bench.main(["checkpoint", str(out), "--model", "tiny", "--prompts", "3", "--prompt-tokens", "20"]) == 0
    capsys.readouterr()
    assert len((out / "prompts.txt").read_text().splitlines()) == 3
    assert run.main(["--device", "cpu", "--model", str(out), "--prompts-file", str(out / "prompts.txt"),
                     "--max-new-tokens", "2", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3 and all(len(x["token_ids"]) == 2 and not x.get("error") for x in lines), lines


def test_bench_kernel_classes():
    """bench.py --profile's accounting: each kernel in the first class its name matches (cuDNN's
    attention before the GEMMs' "sm90", gemv as a GEMM), busy time as the union of kernels on any
    stream (overlaps counted once), idle as the rest of the span."""
    import bench
    ks = [(0.0, 100.0, "nvjet_tst_128x256_h_bz"), (50.0, 100.0, "cudnn_generated_fort_native_sdpa_sm90_knob"),
          (120.0, 10.0, "tw::fused_add_rmsnorm_kernel<1>"), (200.0, 20.0, "CatArrayBatchedCopy<int>"),
          (230.0, 10.0, "vectorized_elementwise_kernel<silu>"), (245.0, 5.0, "tw::gemv_kernel<8>")]
    p = bench.kernel_classes(ks)
    assert {c: (round(p[c]["ms"] * 1e3), p[c]["kernels"]) for c in bench.CLASSES} == {
        "attention": (100, 1), "gemm": (105, 2), "comm point": (10, 1), "copy/index": (20, 1), "elementwise": (10, 1)}
    assert round(p["span_ms"] * 1e3) == 250 and round(p["idle_ms"] * 1e3) == 250 - 150 - 20 - 10 - 5
    # against a base: the other mode's line and then its difference, class by class
    q = bench.kernel_classes([(2 * s + 1000, 2 * u, n) for s, u, n in ks])   # twice as slow throughout
    text = bench.classes_text({"tp1": p, "tp1-split": q}, "tp1").splitlines()
    assert len(text) == 3 and text[1].strip().startswith("tp1-split: attention 0.20 (1)")
    assert text[2].strip().startswith("- tp1: attention +0.10,") and text[2].endswith("span +0.25, idle +0.07")


def test_bench_serve_by_kind_on_cpu(demo, capsys):
    """bench.py serve --profile on the CPU: every step of the last warm run falls in exactly one kind
    (prefill-heavy, mixed, decode-only), the kinds' seconds add up to at most the run's wall time,
    and each floor counts what its steps read: a decode-only step's KV rows are its sequences' keys.
    The GPU clock it reports is the median of nvidia-smi's busy samples."""
    import bench
    assert bench.main(["serve", "--model", str(demo), "--workloads", "5x12/6", "--budgets", "16", "--max-seqs", "4",
                       "--iters", "1", "--graphs", "0", "--profile"]) == 0
    out = capsys.readouterr().out
    row = json.loads(out.strip().splitlines()[-1])["rows"][0]
    kinds = row["by_kind"]
    assert set(kinds) == {"prefill-heavy", "mixed", "decode-only"}, kinds
    assert sum(k["steps"] for k in kinds.values()) == row["steps"]
    assert 0 < sum(k["s"] for k in kinds.values()) <= row["last_wall_s"] * 1.001
    assert all(k["flop_floor_s"] > 0 for k in kinds.values())
    assert "decode-only:" in out and "prefill-heavy:" in out

    spans = [bench.Span(0, 12, 1), bench.Span(20, 15, 1), bench.Span(40, 0, 16)]
    st = bench.Served(flops=1e12, prompt=16, spans=spans, seconds=0.5)
    assert st.kv_rows == 13 + 16 + 16
    kinds = bench.served_kinds([st, st._replace(prompt=0, spans=spans[:2])], 16, 1.0, 1.0, 1000)
    assert kinds["prefill-heavy"]["steps"] == 1 and kinds["decode-only"]["kv_floor_s"] == 29 * 1000 / 1e9
    assert "mixed" not in kinds and kinds["prefill-heavy"]["flop_floor_s"] == 1.0
    # The GPU's clock in the runs: none on the CPU; from nvidia-smi, the busy samples' medians.
    assert row["clocks"] == {}
    assert bench.busy_clocks("1590, 692.1, 100\n1980, 80.0, 0\n[N/A], 1, 2\n1610, 698.0, 97\n1500, 690.5, 99\n") == {
        "sm_mhz": 1590.0, "watts": 692.1, "samples": 3}


def test_demo_splits_its_steps_and_says_so(cli):
    """The demo runs the weave (on, by default for the demo) and says what it did on stderr."""
    rc, out, err = cli("--max-new-tokens", 4)
    assert rc == 0
    assert "weave on: 1 of 4 steps split in two (the last: 11 tokens as 5 + 6), each half's comm points in turn " \
           "with it (one stream on the CPU); comm local, TP 1" in err, err
    rc, out, err = cli("--max-new-tokens", 4, "--weave", "off")
    assert "weave off: no step split (--weave off); comm local, TP 1" in err, err
