"""Chat with a Phi-3 base model plus a LoRA adapter, from the command line.

    python examples/chat_phi3.py --adapter runs/phi3-lora "What is 17 + 25?"      # one answer, then exit
    python examples/chat_phi3.py --adapter runs/phi3-lora                          # interactive; empty line quits
    python examples/chat_phi3.py --model Phi-3-mini-4k-instruct --adapter out/adapter-peft --system "Be brief."

`--adapter` is a training output directory or checkpoint (adapter.safetensors beside train_config.json, our
format) or a PEFT directory (adapter_config.json); without it the base model answers alone. The base is
`--model`, else the one the adapter was trained on. Greedy decoding by default; `--temperature` samples.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import lora
from lora.phi3 import DEFAULT_TARGETS, from_pretrained, generate, load_peft_adapter, patch
from lora.phi3.chat import TEMPLATES, encode_prompt, stop_token_ids, template_from_checkpoint
from lora.phi3.peft_format import read_peft_config
from lora.phi3.tokenizer import load_tokenizer

EMBEDDED_DIR = Path(__file__).resolve().parents[1] / "runs" / "tiny-phi3-v2"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line: a prompt (or none: interactive), model, adapter and decoding options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt", nargs="?", help="one user message to answer; omit for an interactive chat")
    parser.add_argument("--model", help="base checkpoint directory (default: the adapter's base, else the "
                                        f"embedded tiny model in {EMBEDDED_DIR})")
    parser.add_argument("--adapter", help="training output dir / checkpoint (ours) or PEFT adapter directory")
    parser.add_argument("--system", help="system message (dropped by the April 2024 template, which has none)")
    parser.add_argument("--chat-template", default="auto", choices=("auto", *TEMPLATES),
                        help="auto: the one the run trained with, else the checkpoint's tokenizer_config.json, "
                             "else the current Phi-3 template")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="length limit of each answer")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sample with top-p")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus of the sampling (with --temperature)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="base weight dtype (default: the run's, else the checkpoint's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    return parser.parse_args(argv)


def load(args: argparse.Namespace) -> tuple[torch.nn.Module, Path, dict]:
    """The base model with the adapter applied, the base directory, and the run's settings (ours; else empty).

    An adapter of ours is applied as the run trained it (its targets, rank, rsLoRA, DoRA, weight dtype); a PEFT
    adapter goes on the base its `adapter_config.json` names, unless `--model` says otherwise.
    """
    adapter = Path(args.adapter) if args.adapter else None
    run_config: dict = {}
    peft_base = None
    if adapter is not None and (adapter / "adapter_config.json").is_file():
        peft_base = read_peft_config(adapter).get("base_model_name_or_path")
    elif adapter is not None:
        if not (adapter / "adapter.safetensors").is_file() or not (adapter / "train_config.json").is_file():
            raise ValueError(f"--adapter {adapter}: expected adapter_config.json (PEFT) or adapter.safetensors "
                             "with train_config.json (a train_phi3.py output or checkpoint)")
        run_config = json.loads((adapter / "train_config.json").read_text())
    base = Path(args.model or run_config.get("model") or peft_base or EMBEDDED_DIR)
    if not (base / "config.json").is_file():
        origin = ("--model" if args.model else "the run's model (train_config.json)" if run_config.get("model")
                  else "the adapter's base_model_name_or_path" if peft_base else "the embedded model")
        raise ValueError(f"base model {base} ({origin}): no config.json (run examples/train_phi3.py once to build "
                         "the embedded model, or pass --model)")
    trained_dtype = run_config.get("dtype", "auto")
    dtype = args.dtype or (None if trained_dtype == "auto" else trained_dtype)
    model = from_pretrained(base, dtype=dtype, device=args.device)
    if adapter is not None and run_config:
        targets = run_config["target_modules"]
        patch(model, r=run_config["r"], lora_alpha=run_config["lora_alpha"], lora_dropout=0.0,
              targets=DEFAULT_TARGETS if targets in ("all-linear", ["all-linear"]) else tuple(targets),
              use_rslora=run_config["use_rslora"], use_dora=run_config.get("use_dora", False))
        lora.load_adapter(model, adapter / "adapter.safetensors")
    elif adapter is not None:
        load_peft_adapter(model, adapter)
    return model.eval(), base, run_config


def main(argv: list[str] | None = None) -> int:
    """Answer the prompt, or chat until an empty line or end of input; the history is kept."""
    args = parse_args(argv)
    model, base, run_config = load(args)
    tokenizer = load_tokenizer(base)
    name = args.chat_template
    if name == "auto":  # the template the run trained with, where it chose one
        name = run_config.get("chat_template", "auto")
    template = template_from_checkpoint(base) if name == "auto" else TEMPLATES[name]
    stops = stop_token_ids(tokenizer)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = args.prompt is None
    device = next(model.parameters()).device
    while True:
        if interactive:
            try:
                line = input("you> ").strip()
            except EOFError:
                break
            if not line:
                break
        else:
            line = args.prompt
        messages.append({"role": "user", "content": line})
        prompt = encode_prompt(tokenizer, messages, template)
        out = generate(model, torch.tensor([prompt], device=device), max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_p=args.top_p, stop_token_ids=stops)
        answer = tokenizer.decode(out[0, len(prompt):].tolist(), skip_special_tokens=True).strip()
        messages.append({"role": "assistant", "content": answer})
        print(answer if not interactive else f"assistant> {answer}", flush=True)
        if not interactive:
            break
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
