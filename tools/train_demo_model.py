"""Train the small Llama-architecture demo model that pd-serve ships, on tinyshakespeare.

Steps (each resumable on its own):
1. train a byte-level BPE tokenizer with `tokenizers` on the corpus;
2. train a `transformers` LlamaForCausalLM from scratch (GPU when present, else CPU);
3. keep the checkpoint with the lowest held-out loss and write it in the Hugging Face layout
   (config.json, model.safetensors in bf16, tokenizer.json, tokenizer_config.json with a chat
   template, generation_config.json, train_report.json).

Run: python tools/train_demo_model.py --corpus ../shared/corpora/tinyshakespeare/input.txt \
         --out models/shakespeare-llama
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args()


def train_tokenizer(corpus: Path, vocab_size: int, out: Path) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(corpus)], trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    return tok


def model_config(args: argparse.Namespace, tok: Tokenizer) -> LlamaConfig:
    from transformers import LlamaConfig

    eos = tok.token_to_id("<|endoftext|>")
    return LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=args.hidden,
        intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.context, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        attention_bias=False, mlp_bias=False,
    )


def add_residual_dropout(model: LlamaForCausalLM, rate: float) -> None:
    """Dropout on the embedding and on each MLP/attention output (training only).

    HF Llama has no residual dropout; on a 300k-token corpus the model memorises the training
    split within a few hundred steps without it.
    """
    import torch

    def hook(module: torch.nn.Module, _inputs: tuple[Any, ...],
             output: torch.Tensor | tuple[Any, ...]) -> torch.Tensor | tuple[Any, ...]:
        if isinstance(output, tuple):
            return (torch.nn.functional.dropout(output[0], rate, module.training),) + output[1:]
        return torch.nn.functional.dropout(output, rate, module.training)

    model.model.embed_tokens.register_forward_hook(hook)
    for layer in model.model.layers:
        layer.mlp.register_forward_hook(hook)
        layer.self_attn.register_forward_hook(hook)


def batches(data: torch.Tensor, seq_len: int, batch: int,
            gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen)
    x = torch.stack([data[s:s + seq_len] for s in starts])
    y = torch.stack([data[s + 1:s + seq_len + 1] for s in starts])
    return x, y


def evaluate(model: LlamaForCausalLM, data: torch.Tensor, seq_len: int, device: str) -> float:
    import torch

    model.eval()
    losses = []
    with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16,
                                         enabled=device == "cuda"):
        for s in range(0, len(data) - seq_len - 1, seq_len):
            x = data[s:s + seq_len][None].to(device)
            y = data[s + 1:s + seq_len + 1][None].to(device)
            logits = model(input_ids=x).logits.float()
            losses.append(torch.nn.functional.cross_entropy(logits[0], y[0]).item())
    model.train()
    return sum(losses) / len(losses)


def lr_at(step: int, peak: float, steps: int) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to 10% of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train(args: argparse.Namespace, tok: Tokenizer) -> dict[str, Any]:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids = tok.encode(args.corpus.read_text()).ids
    data = torch.tensor(ids, dtype=torch.long)
    split = int(len(data) * 0.95)
    train_data, val_data = data[:split], data[split:]
    cfg = model_config(args, tok)
    # PreTrainedModel.to is wrapped with functools.wraps, and typeshed's _Wrapped does not bind
    # `self` on a method, so mypy checks the first argument against `self` (hence the ignores).
    model: LlamaForCausalLM = LlamaForCausalLM(cfg).to(device)  # type: ignore[arg-type]
    add_residual_dropout(model, args.dropout)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                            weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    best, t0 = float("inf"), time.time()
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, float]] = []
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.lr, args.steps)
        x, y = batches(train_data, args.seq_len, args.batch, gen)
        x, y = x.to(device), y.to(device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(input_ids=x).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.eval_every == 0 or step == args.steps - 1:
            val = evaluate(model, val_data, args.seq_len, device)
            history.append({"step": step, "train_loss": loss.item(), "val_loss": val,
                            "elapsed_s": round(time.time() - t0, 1)})
            print(json.dumps(history[-1]), flush=True)
            if val < best:
                best = val
                best_state = {k: v.detach().to("cpu", copy=True)
                              for k, v in model.state_dict().items()}
    # A fresh model without the dropout hooks is what gets saved.
    model = LlamaForCausalLM(cfg)
    assert best_state is not None, "no finite validation loss"
    model.load_state_dict(best_state)
    model = model.to(torch.bfloat16)  # type: ignore[arg-type]  # functools.wraps, as above
    model.save_pretrained(str(args.out), safe_serialization=True)
    return {"params": n_params, "train_tokens": len(train_data), "val_tokens": len(val_data),
            "best_val_loss": best, "device": device, "history": history,
            "train_seconds": round(time.time() - t0, 1), "args": {
                k: str(v) for k, v in vars(args).items()}}


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(args.corpus, args.vocab_size, args.out)
    report = train(args, tok)
    report["args"]["corpus"] = args.corpus.name
    report["args"]["out"] = args.out.name
    (args.out / "train_report.json").write_text(json.dumps(report, indent=2))
    print(f"saved {args.out} params={report['params']} best_val_loss={report['best_val_loss']:.3f}")


if __name__ == "__main__":
    main()
