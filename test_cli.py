"""run.py's command line (issue 13): every bad input gets one clear `error:` line that names the flag
or file and says what to do, nothing is silently ignored, no Traceback, and nothing crashes after
success. In-process through run.main(argv) on the demo model (made once per module); torchrun only
where ranks matter."""
import gc
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import comm
import engine
import models
import run

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


def test_corrupt_tokenizer(cli, demo, tmp_path):
    path = copy_demo(demo, tmp_path)
    (path / "tokenizer.json").write_text('{"truncated": ')
    line = fails(cli, "--model", path)
    assert f"{path / 'tokenizer.json'} is not a readable tokenizer" in line and "download it again" in line
    (path / "tokenizer.json").unlink()
    assert f"no tokenizer.json in {path}" in fails(cli, "--model", path)


def test_broken_chat_template(cli, demo, tmp_path):
    path = copy_demo(demo, tmp_path)
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for %}"}))
    line = fails(cli, "--model", path, "--chat")
    assert f"--chat: the chat template in {path / 'tokenizer_config.json'} does not render" in line, line
    (path / "tokenizer_config.json").write_text("{}")
    assert "--chat: the checkpoint in" in fails(cli, "--model", path, "--chat")


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

    rc, out, _ = cli("--prompt", "The quick brown fox", "--prompt", long, "--max-new-tokens", 4, "--json")
    assert rc == 1
    lines = {r["index"]: r for r in map(json.loads, out.splitlines())}
    assert set(lines) == {0, 1} and "error" not in lines[0] and len(lines[0]["token_ids"]) == 4
    assert "exceeds the model's context of 2048" in lines[1]["error"] and lines[1]["token_ids"] == []


# ----------------------------------------------------------------------------- flags


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


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_tuning_not_a_table(cli, tmp_path, content):
    f = tmp_path / "t.json"
    f.write_text(content)
    line = fails(cli, "--tuning", f)
    assert f"--tuning: tuning file {f} is not a table written by bench.py tune" in line and "again" in line


@pytest.mark.parametrize("backend", ["fused", "nccl", "gloo"])
def test_comm_needs_ranks_before_loading(cli, backend):
    rc, out, err = cli("--comm", backend)
    assert rc == 1 and out == ""
    line = error_line(err)
    assert f"comm {backend} needs 2 or more ranks" in line and "(use auto)" in line
    assert "loading" not in err and "no --model given" not in err   # failed before the checkpoint
    if backend != "gloo":   # with ranks, the next thing that can be wrong is the device
        with pytest.raises(ValueError, match="needs CUDA GPUs; on the CPU use gloo"):
            comm.check_comm(backend, comm.Dist(world=2))


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
    """Issue 13's rare abort at exit: the engine (its CUDA graphs captured the comm's collectives),
    the comm buffers and the model must be gone before the process group is destroyed, also after
    an error; and with every rank done, destroy follows a barrier."""
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


# ----------------------------------------------------------------------------- torchrun


def torchrun(*args, nproc=2, env=None, launcher=()):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *launcher,
           os.path.join(HERE, "run.py"), "--device", "cpu", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def test_error_printed_once_across_ranks(tmp_path):
    """Both ranks see the bad argument; rank 0 alone prints it. --tee keeps a copy of each rank's
    output, so the ranks' own stderr can be told from torchrun's: on any nonzero exit the launcher
    prints its own ChildFailedError report, Traceback included, which no script can avoid."""
    r = torchrun("--max-new-tokens", "0", launcher=["--tee", "3", "--log-dir", str(tmp_path)])
    assert r.returncode != 0
    shown = [line for line in r.stderr.splitlines() if "error:" in line]
    assert shown == ["[default0]:error: argument --max-new-tokens: must be at least 1, got 0"], r.stderr
    logs = {p.parent.name: p.read_text() for p in tmp_path.rglob("stderr.log")}
    assert logs == {"0": "error: argument --max-new-tokens: must be at least 1, got 0\n", "1": ""}, logs


def test_json_first_run_and_ttft_tp2(tmp_path):
    """A fresh cache (the demo is made on this run): stdout is JSON lines only, on both ranks; and
    time to first token does not include the wait for the other rank to load."""
    r = torchrun("--json", "--max-new-tokens", "4", "--prompt", "The quick brown fox", "--prompt", "Once upon",
                 env={"XDG_CACHE_HOME": str(tmp_path)})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert os.path.exists(tmp_path / "tokenweave" / "demo-llama-v2" / "model.safetensors")
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert sorted(x["index"] for x in lines) == [0, 1]
    for x in lines:
        assert {"index", "prompt", "text", "token_ids", "ttft_s"} <= set(x) and len(x["token_ids"]) == 4
        assert 0 < x["ttft_s"] < 1.0, x


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
    out = capsys.readouterr().out
    assert out.startswith("--- The quick brown fox\n") and "time to first token" in out
