"""Evaluation during training: the loss over an eval set (sharded across processes) and a greedy sample.

>>> evaluation = Evaluation(eval_rows, batch_size=8, pad_id=pad, tokenizer=tok, template=PHI3,  # doctest: +SKIP
...                         prompt="What is 17 + 25?", max_new_tokens=64)
>>> loss, answer = evaluation(model, Processes(0, 1, torch.device("cpu")))                   # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lora.phi3.chat import ChatTemplate, encode_prompt, stop_token_ids
from lora.phi3.data import Example, collate
from lora.phi3.distributed import Processes
from lora.phi3.fsdp import root_unsharded
from lora.phi3.generation import generate
from lora.phi3.model import Phi3ForCausalLM
from lora.phi3.tokenizer import Tokenizer

__all__ = ["Evaluation"]


@dataclass
class Evaluation:
    """The eval set and the sample prompt: `evaluation(model, procs)` is `(eval loss, sample answer)`, computed
    on a forked RNG (a training run's random stream never depends on evaluating), in eval mode (no dropout), and
    leaving the model in training mode."""

    rows: list[Example]
    batch_size: int
    pad_id: int
    tokenizer: Tokenizer
    template: ChatTemplate
    prompt: str
    max_new_tokens: int

    def __post_init__(self) -> None:
        if not self.rows:
            raise ValueError("Evaluation needs at least one eval row")

    def __call__(self, model: Phi3ForCausalLM, procs: Processes) -> tuple[float, str]:
        with torch.random.fork_rng(devices=procs.rng_devices):
            loss = self.loss(model, procs)
            sample = self.sample(model, procs.device) if procs.rank == 0 or procs.sharded else ""
        return loss, sample

    @torch.no_grad()
    def loss(self, model: Phi3ForCausalLM, procs: Processes) -> float:
        """Mean loss over every target token of the eval set: each rank a shard (`rows[rank::world]`), summed
        across ranks.

        Sharded (FSDP), every forward is collective, so each rank runs as many batches as rank 0 (whose shard
        is the largest); a rank out of rows runs its first row again and does not count it.
        """
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=procs.device)  # (loss sum, token count)
        shard, size = self.rows[procs.rank :: procs.world], self.batch_size
        for k in range(math.ceil(len(self.rows[0 :: procs.world] if procs.sharded else shard) / size)):
            part, weight = shard[k * size : (k + 1) * size], 1
            if not part:
                part, weight = self.rows[:1], 0
            batch = collate(part, self.pad_id).to(procs.device)
            total[0] += weight * model.loss(batch.input_ids, batch.labels, position_ids=batch.position_ids,
                                            document_ids=batch.document_ids, reduction="sum").double()
            total[1] += weight * batch.num_targets
        if procs.world > 1:
            dist.all_reduce(total)
        model.train()
        if not total[1] > 0:  # every rank sees the same sums
            raise ValueError("the eval set has no target tokens (labelled assistant tokens): its loss is undefined")
        return float(total[0] / total[1])

    def sample(self, model: Phi3ForCausalLM, device: torch.device) -> str:
        """Greedy answer to the prompt (KV cache; stops on the tokenizer's stop tokens)."""
        ids = encode_prompt(self.tokenizer, [{"role": "user", "content": self.prompt}], self.template)
        with root_unsharded(model):  # under FSDP every rank decodes the same answer
            out = generate(model, torch.tensor([ids], device=device), max_new_tokens=self.max_new_tokens,
                           stop_token_ids=stop_token_ids(self.tokenizer))
        return self.tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True).strip()
