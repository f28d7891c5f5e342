"""Every directory we write is replaced as a whole: a failure between any two file operations changes nothing.

The fault is injected at the k-th file write or rename (k = 1, 2, ... until the save gets through), over an
earlier save with other settings; after each fault the directory must hold exactly the earlier save.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from phi3_tiny import randomise_adapters
from safetensors import torch as safetensors_torch

from lora.phi3 import (
    checkpoint,
    from_pretrained,
    load_peft_adapter,
    merge_and_save,
    merged_checkpoint,
    patch,
    peft_format,
    save_peft_adapter,
    save_pretrained,
)


class Fault(Exception):
    """The injected failure."""


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.parent.iterdir() if p.name.startswith(f".{directory.name}.")]


def fail_at(monkeypatch: pytest.MonkeyPatch, k: int) -> None:
    """Raise Fault at the k-th file write (safetensors, text, copy) or rename, counted across all of them."""
    calls = [0]

    def wrap(function):
        def wrapped(*args, **kwargs):
            calls[0] += 1
            if calls[0] == k:
                raise Fault(f"injected at operation {k}")
            return function(*args, **kwargs)
        return wrapped

    for module in (checkpoint, peft_format):
        monkeypatch.setattr(module, "save_file", wrap(safetensors_torch.save_file))
    monkeypatch.setattr(merged_checkpoint, "_write_safetensors", wrap(merged_checkpoint._write_safetensors))
    monkeypatch.setattr(Path, "write_text", wrap(Path.write_text))
    monkeypatch.setattr(shutil, "copy2", wrap(shutil.copy2))
    monkeypatch.setattr(os, "replace", wrap(os.replace))
    monkeypatch.setattr(os, "rename", wrap(os.rename))


def assert_all_or_nothing(monkeypatch: pytest.MonkeyPatch, directory: Path, save) -> int:
    """Run `save` with a fault at operation 1, 2, ...: each leaves `directory` as it was; returns the count."""
    before = snapshot(directory)
    for k in range(1, 50):
        with monkeypatch.context() as m:
            fail_at(m, k)
            try:
                save()
            except Fault:
                pass
            else:
                break
        assert snapshot(directory) == before, f"a fault at operation {k} changed {directory}"
        assert not leftovers(directory), k
    else:
        raise AssertionError("the save never completed")
    assert snapshot(directory) != before
    assert not leftovers(directory)
    return k - 1


def patched(path: Path, seed: int, **kwargs) -> torch.nn.Module:
    model = from_pretrained(path)
    patch(model, r=4, lora_alpha=8, targets=("q", "v", "o_proj"), **kwargs)
    randomise_adapters(model, seed=seed)
    return model.eval()


def test_save_pretrained_over_an_earlier_save(hf_checkpoint, tmp_path, monkeypatch):
    _, path = hf_checkpoint()
    out = tmp_path / "saved"
    model = from_pretrained(path)
    save_pretrained(model, out)  # one file; the new save is sharded, with another rope_theta
    (out / "tokenizer.json").write_text("{}")
    model.config.rope_theta = 1234.0
    faults = assert_all_or_nothing(monkeypatch, out, lambda: save_pretrained(model, out, max_shard_size=20_000))
    assert faults >= 4  # shards, index, configs, the rename
    assert from_pretrained(out).config.rope_theta == 1234.0 and (out / "tokenizer.json").read_text() == "{}"
    assert not (out / "model.safetensors").exists()


def test_save_peft_adapter_over_an_earlier_adapter(hf_checkpoint, tmp_path, monkeypatch):
    _, path = hf_checkpoint()
    out = tmp_path / "adapter"
    save_peft_adapter(patched(path, seed=1), out)
    (out / "README.md").write_text("notes")
    new = patched(path, seed=2, use_rslora=True)
    assert_all_or_nothing(monkeypatch, out, lambda: save_peft_adapter(new, out))
    loaded = patched(path, seed=3, use_rslora=True)
    load_peft_adapter(loaded, out)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), new.state_dict().values(), strict=True))
    assert (out / "README.md").read_text() == "notes"


def test_merge_and_save_overwrite(hf_checkpoint, tmp_path, monkeypatch):
    _, path = hf_checkpoint()
    (path / "tokenizer.json").write_text("{}")
    out = tmp_path / "merged"
    merge_and_save(patched(path, seed=1), out)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        merge_and_save(patched(path, seed=2), out)
    new = patched(path, seed=2)
    assert_all_or_nothing(monkeypatch, out, lambda: merge_and_save(new, out, overwrite=True))


def test_probe_ids_out_of_vocabulary(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint()
    model = patched(path, seed=1)
    with pytest.raises(ValueError, match=r"probe_ids must be token ids in \[0, \d+\).*got ids from 0 to 100000"):
        merge_and_save(model, tmp_path / "m", probe_ids=torch.tensor([[0, 100000]]))
    assert not (tmp_path / "m").exists()
