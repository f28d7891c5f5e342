"""Run by tests/test_sharding.py under torchrun (2 gloo processes): the library on a model sharded with FSDP2."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.tensor import Shard, distribute_tensor

import lora
from lora.phi3 import (
    Phi3Config,
    Phi3ForCausalLM,
    from_pretrained,
    load_peft_adapter,
    merge_and_save,
    patch,
    save_peft_adapter,
    save_pretrained,
)
from lora.phi3.fsdp import from_pretrained_sharded
from lora.sharding import full_tensor, is_sharded


def main(tmp: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # Odd sizes: rows that do not split evenly over 2 ranks (FSDP2 pads the last shard).
    config = Phi3Config(vocab_size=67, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        original_max_position_embeddings=64, pad_token_id=None)
    if rank == 0:
        torch.manual_seed(0)
        save_pretrained(Phi3ForCausalLM(config), tmp / "base")
    dist.barrier()
    # Per-slice adapters on qkv_proj (a MergedLinear: block-diagonal in PEFT's format) and whole-module ones.
    lora_args = dict(r=4, lora_alpha=8, lora_dropout=0.0, targets=("q", "v", "o_proj", "down_proj"))
    torch.manual_seed(1)
    reference = from_pretrained(tmp / "base")
    patch(reference, **lora_args)
    torch.manual_seed(1)
    model = from_pretrained_sharded(tmp / "base", prepare=lambda m: patch(m, **lora_args))
    assert is_sharded(model) and not is_sharded(reference)
    # Same adapters drawn, same loss through FSDP2's hooks, same gradients once gathered.
    ids = torch.randint(0, 67, (2, 9), generator=torch.Generator().manual_seed(2))
    want, got = reference.loss(ids, ids, reduction="sum"), model.loss(ids, ids, reduction="sum")
    torch.testing.assert_close(got, want)
    want.backward()
    got.backward()
    sharded = dict(model.named_parameters())
    for name, param in reference.named_parameters():
        if param.requires_grad:
            # FSDP2 averages over ranks: each rank saw the same batch here.
            torch.testing.assert_close(full_tensor(sharded[name].grad), param.grad, msg=name)
    # The logits path (`model(ids)` with gradients) gathers the lm_head again in backward, which the chunked loss
    # does not need; then `model(ids, labels)` goes back to not gathering it. Both equal the unsharded model.
    for step in ("logits", "labels"):
        reference.zero_grad()
        model.zero_grad()
        for net in (reference, model):
            out = net(ids).float().pow(2).mean() if step == "logits" else net(ids, ids, reduction="sum")
            out.backward()
        for name, param in reference.named_parameters():
            if param.requires_grad:
                torch.testing.assert_close(full_tensor(sharded[name].grad), param.grad, msg=f"{step}: {name}")
    # lora_state_dict gathers whole tensors; full=False leaves the shards.
    state = lora.lora_state_dict(model)
    assert state.keys() == lora.lora_state_dict(reference).keys()
    for name, tensor in lora.lora_state_dict(reference).items():
        assert torch.equal(state[name], tensor), name
    assert all(is_sharded(t) for t in lora.lora_state_dict(model, full=False).values())
    # save_adapter: gathered, rank 0 writes; load_adapter: each rank its slice.
    with torch.no_grad():
        for param in reference.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(3)))
    if rank == 0:
        lora.save_adapter(reference, tmp / "changed.safetensors")
        save_peft_adapter(reference, tmp / "changed-peft")
    dist.barrier()
    lora.load_adapter(model, tmp / "changed.safetensors")
    for name, tensor in lora.lora_state_dict(reference).items():
        assert torch.equal(lora.lora_state_dict(model)[name], tensor), name
    lora.save_adapter(model, tmp / f"sharded-{rank}.safetensors")
    save_peft_adapter(model, tmp / f"sharded-peft-{rank}")
    dist.barrier()
    assert not (tmp / "sharded-1.safetensors").exists() and not (tmp / "sharded-peft-1").exists()
    saved, expected = load_file(tmp / "sharded-0.safetensors"), load_file(tmp / "changed.safetensors")
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    peft_saved = load_file(tmp / "sharded-peft-0" / "adapter_model.safetensors")
    peft_expected = load_file(tmp / "changed-peft" / "adapter_model.safetensors")
    assert all(torch.equal(peft_saved[k], peft_expected[k]) for k in peft_expected)
    # load_peft_adapter into the sharded model: back to the reference after a change.
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.zero_()
    load_peft_adapter(model, tmp / "changed-peft")
    for name, tensor in lora.lora_state_dict(reference).items():
        torch.testing.assert_close(lora.lora_state_dict(model)[name], tensor, msg=name)
    torch.testing.assert_close(model(ids), reference(ids))
    # A state dict with one wrong LoRA shape changes nothing in the sharded model: FSDP2's own load hooks do not
    # turn the whole-state-dict check off.
    before = {k: v.full_tensor().clone() for k, v in model.state_dict().items() if "lora_" in k}
    bad = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    last = sorted(bad)[-1]
    bad[last] = distribute_tensor(torch.zeros(bad[last].shape[0], bad[last].shape[1] + 1), bad[last].device_mesh,
                                  [Shard(0)])
    with pytest.raises(ValueError, match=f"shape mismatch for {last}"):
        model.load_state_dict(bad, strict=False)
    assert all(torch.equal(v.full_tensor(), before[k]) for k, v in model.state_dict().items() if "lora_" in k)
    # What needs the whole model refuses a sharded one.
    with pytest.raises(ValueError, match="not one sharded with FSDP2"):
        merge_and_save(model, tmp / f"merged-{rank}")
    with pytest.raises(ValueError, match="not one sharded with FSDP2"):
        save_pretrained(model, tmp / f"saved-{rank}")
    print(f"rank {rank}: sharded library checks passed", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
