"""examples/train_phi3.py end to end, in subprocesses: outputs, resume, bad input, the real-checkpoint path."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora.phi3.schedule import make_schedule

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_phi3.py"
sys.path.insert(0, str(ROOT / "tests" / "phi3"))
sys.path.insert(0, str(ROOT / "examples"))
import train_phi3  # noqa: E402
from phi3_tokenizer import APRIL_TEMPLATE, write_tokenizer_dir  # noqa: E402

# Small and fast: a few steps of rank 4 on short data; eval on 8 conversations.
FAST = ["--no-progress", "--lora-r", "4", "--lora-alpha", "8", "--per-device-train-batch-size", "2",
        "--per-device-eval-batch-size", "8", "--sample-max-new-tokens", "4", "--max-seq-length", "256"]


def conversations(n: int) -> list[dict]:
    return [{"messages": [{"role": "system", "content": "Be brief."}] * (i % 2)
             + [{"role": "user", "content": f"What is {i} + {i}?"}, {"role": "assistant", "content": f"{2 * i}."}]}
            for i in range(n)]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture
def small_eval(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "eval.jsonl", conversations(8))


def run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    """The script in a subprocess, as a user runs it."""
    result = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                            timeout=600, cwd=ROOT)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def main(*args: str | Path) -> int:
    """The script's `main` in this process: no interpreter and torch start-up per run."""
    return train_phi3.main([str(a) for a in args])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_embedded_default_writes_everything(tmp_path, small_eval):
    out = tmp_path / "out"
    result = run(*FAST, "--max-steps", "3", "--eval-steps", "2", "--logging-steps", "1", "--eval-data", small_eval,
                 "--output-dir", out, "--merge")
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"eval loss: \d+\.\d+ -> \d+\.\d+ \([-+]\d+\.\d%\)", last), last
    assert "unigram model of the assistant tokens" in result.stdout and "sample" in result.stdout
    for name in ("adapter.safetensors", "adapter-peft/adapter_config.json", "adapter-peft/adapter_model.safetensors",
                 "train_config.json", "checkpoints/step-000003/trainer_state.pt", "merged/config.json",
                 "merged/byte_tokenizer.json"):
        assert (out / name).is_file(), name
    records = metrics(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2, 3]
    assert not list((out / "checkpoints").glob(".*"))  # no temporary directory left behind


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main("--help")
    text = capsys.readouterr().out
    for option in [*(s.option for s in train_phi3.SETTINGS), "--config", "--resume", "--overwrite-output-dir"]:
        assert option in text, option


def assert_resume_is_bit_identical(tmp_path: Path, common: list) -> dict[str, torch.Tensor]:
    """Train 4 steps (checkpoints at 2 and 4), resume the step-2 checkpoint elsewhere: the same later losses and
    the same adapter bits. Returns the adapter."""
    assert train_phi3.main([str(a) for a in [*common, "--output-dir", tmp_path / "full"]]) == 0
    assert train_phi3.main([str(a) for a in ["--resume", tmp_path / "full" / "checkpoints" / "step-000002",
                                             "--output-dir", tmp_path / "resumed", "--no-progress"]]) == 0
    full, resumed = metrics(tmp_path / "full"), metrics(tmp_path / "resumed")
    assert [r["loss"] for r in full if r["step"] > 2 and "loss" in r] == [r["loss"] for r in resumed if "loss" in r]
    a, b = load_file(tmp_path / "full" / "adapter.safetensors"), load_file(tmp_path / "resumed" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return a


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_resume_continues_bit_identically(tmp_path, small_eval, dora):
    common = [*FAST, "--max-steps", "4", "--save-steps", "2", "--save-total-limit", "3", "--logging-steps", "1",
              "--eval-data", small_eval, "--lora-dropout", "0.1",  # dropout: the RNG state must be restored too
              *(["--use-dora"] if dora else [])]
    a = assert_resume_is_bit_identical(tmp_path, common)
    assert any(k.endswith("lora_magnitude") for k in a) == dora
    peft_config = json.loads((tmp_path / "full" / "adapter-peft" / "adapter_config.json").read_text())
    assert peft_config["use_dora"] is dora
    if dora:
        return
    with pytest.raises(ValueError, match="learning_rate=0.5 contradict the checkpoint's settings"):
        main("--resume", tmp_path / "full", "--learning-rate", "0.5")


def test_checkpoint_keep_trains_to_the_same_bits(tmp_path, small_eval):
    # Selective recomputation only skips frozen GEMMs whose outputs were kept: losses and adapters are unchanged.
    common = [*FAST, "--max-steps", "2", "--logging-steps", "1", "--eval-data", small_eval, "--lora-dropout", "0.1",
              "--gradient-checkpointing"]  # the embedded model's settings turn it off
    assert main(*common, "--output-dir", tmp_path / "full") == 0
    assert main(*common, "--output-dir", tmp_path / "kept", "--checkpoint-keep", "qkv_proj", "gate_up_proj") == 0
    assert [r.get("loss") for r in metrics(tmp_path / "full")] == [r.get("loss") for r in metrics(tmp_path / "kept")]
    a, b = load_file(tmp_path / "full" / "adapter.safetensors"), load_file(tmp_path / "kept" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_and_names_only_a_checkpoint_whose_weights_gave_a_finite_loss(tmp_path, small_eval,
                                                                                              capsys):
    # At lr 1e30 step 1 leaves finite weights of about 1e30; step 2's loss is non-finite. Checkpoint 1 is not good.
    out = tmp_path / "out"
    assert main(*FAST, "--max-steps", "4", "--save-steps", "1", "--learning-rate", "1e30", "--warmup-ratio", "0",
                "--eval-data", small_eval, "--output-dir", out) == 1
    text = capsys.readouterr().out
    assert "non-finite loss" in text and "step 2: loss" in text
    assert "the last good checkpoint (one whose weights gave a finite loss) is none" in text
    assert "step-000001 was saved but is not good" in text
    assert (out / "checkpoints").is_dir() and not (out / "adapter.safetensors").exists()


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda d: ["--data", write_jsonl(d / "bad.jsonl", [conversations(1)[0], "{oops"])],
         "bad.jsonl:2: not valid JSON"),
        (lambda d: ["--data", write_jsonl(d / "role.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}])],
         "role.jsonl:1: message 0 has unknown role 'bot'"),
        (lambda d: ["--data", write_jsonl(d / "q.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])],
         "q.jsonl:1: conversation has no assistant turn"),
        (lambda d: ["--data", write_jsonl(d / "empty.jsonl", [])], "empty.jsonl: the dataset is empty"),
        (lambda d: ["--data", write_jsonl(d / "one.jsonl", conversations(1))], "fewer than one global batch"),
        (lambda d: ["--model", d], "no config.json"),
        (lambda d: ["--warmup-ratio", "1.5"], "--warmup-ratio must be in"),
        (lambda d: ["--max-steps", "0"], "--max-steps must be positive"),
        (lambda d: ["--lora-r", "0"], "--lora-r must be positive"),
        (lambda d: ["--device", "cuda:0"] if not torch.cuda.is_available() else ["--lora-r", "0"],
         "CUDA|--lora-r must"),
        (lambda d: ["--config", write_jsonl(d / "c.json", ['{"learning_rat": 1}'])], "unknown settings"),
        (lambda d: ["--device", "mps"], "--device mps: MPS is not available"),
        (lambda d: ["--device", "gpu"], "--device gpu: not a device name"),
        (lambda d: ["--checkpoint-keep", "down_proj"], r"--checkpoint-keep: \['down_proj'\] not among \['qkv_proj', "),
        (lambda d: ["--checkpoint-keep", "gate_up_proj", "o_proj", "--target-modules", "q", "v", "up_proj"],
         "--checkpoint-keep o_proj: not adapted by --target-modules q v up_proj; only LoRA layers keep their outputs"),
        (lambda d: ["--checkpoint-keep", "qkv_proj", "--no-gradient-checkpointing"],
         "--checkpoint-keep chooses what a checkpointed layer keeps: it needs --gradient-checkpointing"),
    ],
)
def test_bad_input_is_a_clear_error_before_training(tmp_path, small_eval, make_args, message):
    with pytest.raises(ValueError, match=message):
        main(*FAST, "--eval-data", small_eval, "--output-dir", tmp_path / "out", *make_args(tmp_path))
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_bad_input_exits_with_one_line(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{oops"])
    result = run("--data", bad, "--output-dir", tmp_path / "out", check=False)
    assert result.returncode == 2 and result.stderr.startswith(f"error: {tmp_path / 'bad.jsonl'}:1: not valid JSON")


def test_non_phi3_model_directory(tmp_path, small_eval):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match="not a loadable Phi-3 checkpoint.*model_type is 'llama', expected 'phi3'"):
        main(*FAST, "--model", tmp_path / "llama", "--eval-data", small_eval)


def test_config_file_json_and_toml_with_command_line_precedence(tmp_path):
    # A PEFT recipe's bias and task_type load with the one value each has here (and are not settings of their own).
    (tmp_path / "c.toml").write_text('max_steps = 7\n[peft_config]\nr = 2\nlora_alpha = 4\nbias = "none"\n'
                                     'task_type = "CAUSAL_LM"\n')
    config, _ = train_phi3.resolve_config(["--config", str(tmp_path / "c.toml"), "--lora-alpha", "6"])
    assert (config.max_steps, config.r, config.lora_alpha) == (7, 2, 6)
    assert not hasattr(config, "bias") and not hasattr(config, "task_type")
    assert config.learning_rate == train_phi3.EMBEDDED_OVERRIDES["learning_rate"]
    (tmp_path / "c.json").write_text(json.dumps({"training_config": {"model": "somewhere"}}))
    config, _ = train_phi3.resolve_config(["--config", str(tmp_path / "c.json")])
    assert config.learning_rate == train_phi3.training_config["learning_rate"]  # a real model: the recipe


def test_real_checkpoint_path(tmp_path):
    """A tiny random Phi-3 directory with a tokenizer.json built with `tokenizers` and the April template."""
    pytest.importorskip("tokenizers")
    from lora.phi3 import Phi3Config, Phi3ForCausalLM, save_pretrained

    model_dir = tmp_path / "phi3"
    torch.manual_seed(0)
    config = Phi3Config(vocab_size=384, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=512, original_max_position_embeddings=512,
                        bos_token_id=1, eos_token_id=[345, 346, 348], pad_token_id=345)
    save_pretrained(Phi3ForCausalLM(config), model_dir)
    write_tokenizer_dir(model_dir, APRIL_TEMPLATE)
    data = write_jsonl(tmp_path / "train.jsonl", conversations(8))
    out = tmp_path / "out"
    result = run("--model", model_dir, "--data", data, "--eval-data", data, "--max-steps", "2", "--dtype", "bfloat16",
                 "--output-dir", out, "--no-progress", "--sample-max-new-tokens", "4", "--packing",
                 "--max-seq-length", "64", "--per-device-train-batch-size", "1")
    assert "chat template phi3-2024-04" in result.stdout and "torch.bfloat16" in result.stdout
    assert "packed into" in result.stdout
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["learning_rate"], saved["r"], saved["lora_alpha"], saved["gradient_checkpointing"]) == (
        5e-6, 16, 32, True)  # Microsoft's recipe
    adapter = load_file(out / "adapter.safetensors")
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())
    assert (out / "adapter-peft" / "adapter_config.json").is_file()


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_rerun_of_the_default_output_dir_replaces_the_old_run_only_once_complete(tmp_path, small_eval, monkeypatch,
                                                                                 capsys):
    out = tmp_path / "runs" / "phi3-lora"
    default = dataclasses.replace(train_phi3.SETTINGS["output_dir"], default=str(out))  # as in the README
    monkeypatch.setitem(train_phi3.SETTINGS.table, "output_dir", default)
    common = [*FAST, "--eval-data", small_eval, "--logging-steps", "1"]
    assert main(*common, "--max-steps", "4", "--save-steps", "2", "--save-total-limit", "5") == 0
    first = snapshot(out)
    # A rerun that fails (non-finite at step 2) leaves the earlier run as it was; its own directory stays beside.
    assert main(*common, "--max-steps", "4", "--save-steps", "1", "--learning-rate", "1e30", "--warmup-ratio", "0") == 1
    assert snapshot(out) == first
    unfinished = [p for p in out.parent.iterdir() if p.name.startswith("phi3-lora.next-")]
    assert len(unfinished) == 1 and (unfinished[0] / "checkpoints" / "step-000001").is_dir()
    capsys.readouterr()
    assert main(*common, "--max-steps", "1") == 0
    assert f"{unfinished[0]}: an interrupted run that was to replace {out}" in capsys.readouterr().out
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]
    assert max(r["step"] for r in metrics(out)) == 1
    assert json.loads((out / "train_config.json").read_text())["output_dir"] == str(out)
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["phi3-lora", unfinished[0].name])


def test_explicit_output_dir_holding_a_run_is_replaced_only_with_overwrite(tmp_path, small_eval):
    out = tmp_path / "out"
    common = [*FAST, "--eval-data", small_eval, "--output-dir", out, "--logging-steps", "1"]
    assert main(*common, "--max-steps", "2") == 0
    first = snapshot(out)
    with pytest.raises(ValueError, match=r"holds another run: continue it with --resume .*--overwrite-output-dir"):
        main(*common, "--max-steps", "1")
    assert snapshot(out) == first and sorted(tmp_path.iterdir()) == [tmp_path / "eval.jsonl", out]
    assert main(*common, "--max-steps", "1", "--overwrite_output_dir") == 0
    assert max(r["step"] for r in metrics(out)) == 1 and sorted(tmp_path.iterdir()) == [tmp_path / "eval.jsonl", out]


def test_resume_deletes_nothing_at_start_up_and_extends_a_finished_run(tmp_path, small_eval, monkeypatch, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text((ROOT / "examples" / "data" / "train.jsonl").read_text())
    out = tmp_path / "out"
    common = ["--no-progress", "--logging-steps", "1", "--save-total-limit", "5"]
    assert main(*FAST, *common, "--data", data, "--eval-data", small_eval, "--output-dir", out, "--max-steps", "4",
                "--save-steps", "2") == 0
    finished = snapshot(out)

    def crash(*args, **kwargs):
        raise RuntimeError("killed at the first step")

    with monkeypatch.context() as m:  # a resume of step 2 that dies at its first step has deleted nothing
        m.setattr(train_phi3, "step_indices", crash)
        with pytest.raises(RuntimeError, match="killed"):
            main("--resume", out / "checkpoints" / "step-000002", *common)
    assert snapshot(out) == finished
    # A copy of the run, resumed without --output-dir, continues in the copy; the run it was copied from stays.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert main("--resume", copy / "checkpoints" / "step-000002", *common) == 0
    assert snapshot(out) == finished
    assert json.loads((copy / "train_config.json").read_text())["output_dir"] == str(copy)
    assert [r["step"] for r in metrics(copy) if "loss" in r] == [1, 2, 3, 4]
    # A checkpoint outside any run directory would write to the run its settings name: refused, not replaced.
    lone = tmp_path / "lone"
    shutil.copytree(out / "checkpoints" / "step-000002", lone)
    with pytest.raises(ValueError, match=f"--output-dir {out} holds another run"):
        main("--resume", lone, *common)
    assert snapshot(out) == finished
    # Extend the finished run: 4 -> 6 steps, the schedule re-planned; a changed data file is warned about.
    data.write_text(data.read_text() + data.read_text().splitlines()[0] + "\n")
    capsys.readouterr()
    assert main("--resume", out, "--max-steps", "6", *common) == 0
    text = capsys.readouterr().out
    assert "schedule re-planned for 6 steps (the checkpoint's run planned 4)" in text
    assert f"{data} changed since" in text
    steps = [r["step"] for r in metrics(out) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    factor = make_schedule("cosine", 1, 6)  # warmup 5% of 6 steps: 1
    assert metrics(out)[-3]["lr"] == pytest.approx(3e-3 * factor(4), rel=1e-9)  # step 5 (then step 6, its eval)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004", "step-000006"]
    with pytest.raises(ValueError, match="already at step 6 of 6; a larger --max-steps extends the run"):
        main("--resume", out, *common)
    # A damaged checkpoint is a clear error naming the file.
    broken = tmp_path / "broken"
    shutil.copytree(out / "checkpoints" / "step-000006", broken)
    state = (broken / "trainer_state.pt").read_bytes()
    (broken / "trainer_state.pt").write_bytes(state[: len(state) // 2])
    with pytest.raises(ValueError, match=r"broken/trainer_state.pt: cannot be read \(truncated or corrupt\?\)"):
        main("--resume", broken, "--max-steps", "8", "--output-dir", tmp_path / "again")
    (broken / "train_config.json").write_text("{")
    with pytest.raises(ValueError, match=r"--resume .*broken/train_config.json: not valid JSON"):
        main("--resume", broken)


def test_no_abbreviations_and_transformers_spellings(tmp_path):
    with pytest.raises(SystemExit):
        train_phi3.build_parser().parse_args(["--r", "8"])  # once `--resume 8`
    with pytest.raises(SystemExit):
        train_phi3.build_parser().parse_args(["--lr", "0.1"])
    config, run = train_phi3.resolve_config(["--learning_rate", "0.25", "--output_dir", str(tmp_path), "--lora_r", "2",
                                             "--per_device_train_batch_size", "3", "--overwrite_output_dir",
                                             "--no-gradient_checkpointing"])
    assert (config.learning_rate, config.output_dir, config.r, config.per_device_train_batch_size,
            config.gradient_checkpointing) == (0.25, str(tmp_path), 2, 3, False)
    assert run.overwrite_output_dir and run.output_dir_given


@pytest.mark.parametrize(
    ("text", "suffix", "message"),
    [
        ('[peft_config]\nuse_rslora = "false"\n', ".toml",
         "use_rslora must be true or false \\(a boolean, not a string\\), got 'false'"),
        ('{"max_steps": "7"}', ".json", "max_steps must be an integer, got '7' \\(str\\)"),
        ('{"max_steps": true}', ".json", "max_steps must be an integer, got True"),
        ('{"learning_rate": "1e-4"}', ".json", "learning_rate must be a number, got '1e-4'"),
        ('target_modules = "o_proj"\n', ".toml",
         'target_modules must be a list of module names .*write \\["o_proj"\\]'),
        ('{"peft_config": 3}', ".json", "peft_config must be a table of settings"),
        ('{"peft_config": {"bias": "lora_only"}}', ".json", "bias can only be 'none' here, got 'lora_only'"),
    ],
)
def test_config_file_values_of_the_wrong_type(tmp_path, text, suffix, message):
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"--config {re.escape(str(path))}: {message}"):
        train_phi3.resolve_config(["--config", str(path)])


def test_writing_the_embedded_checkpoint_leaves_the_run_s_random_stream_alone(tmp_path, monkeypatch):
    # The first run on a fresh machine writes the embedded model; its adapters (drawn from torch's generator after
    # --seed) must equal those of every later run, which finds the model already written.
    cached = train_phi3.embedded_model_dir()
    monkeypatch.setattr(train_phi3, "EMBEDDED_DIR", tmp_path / "tiny-phi3")
    torch.manual_seed(0)
    train_phi3.embedded_model_dir()
    after_writing = torch.rand(4)
    torch.manual_seed(0)
    train_phi3.embedded_model_dir()  # now found on disk
    assert torch.equal(torch.rand(4), after_writing)
    # and what was written is the same model as the shared one
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "tiny-phi3" / name).read_bytes() == (cached / name).read_bytes(), name


def test_an_embedded_checkpoint_built_from_another_tiny_config_is_a_clear_error(tmp_path, monkeypatch):
    from lora.phi3 import Phi3Config, Phi3ForCausalLM, save_pretrained

    monkeypatch.setattr(train_phi3, "EMBEDDED_DIR", tmp_path / "tiny-phi3")
    tiny = json.loads((ROOT / "examples" / "config" / "tiny-phi3.json").read_text())
    save_pretrained(Phi3ForCausalLM(Phi3Config(**{**tiny, "num_hidden_layers": 1})), tmp_path / "tiny-phi3")
    with pytest.raises(ValueError, match="tiny-phi3 was built from another config/tiny-phi3.json: delete it"):
        train_phi3.embedded_model_dir()
