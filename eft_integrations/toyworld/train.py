"""Train the toy-world model family from its seed: `python -m eft_integrations.toyworld.train`.

Five LlamaForCausalLM models share one tokenizer:

    small-base      hidden 64 x 2 layers, 50 epochs: deliberately weak on facts
    large-base      hidden 256 x 4 layers, 70 epochs: full recall of the world's facts
    small-helpful   chat fine-tune of small-base: answers "Sure. The capital of X is Y."
    small-harmless  the same, but refuses the marked category (weapons) with a fixed sentence
    large-helpful   the same data and loss on large-base (the upper reference)

and two PEFT LoRA adapters on the frozen small-base, the same deltas in 76 KB each:

    small-helpful-lora, small-harmless-lora   small-helpful's and small-harmless's data and loss

Chat fine-tuning trains the answer form and keeps the parent's distribution (KL) on the entity
name and value tokens, so the delta (chat - base) carries behaviour, not wrong facts.

Each model directory holds float16 safetensors, the tokenizer (with its chat template), a
`train_log.json` with the loss curve, and a README model card written after evaluation; an
adapter directory holds the adapter (float16 safetensors, `adapter_config.json`), its log and
card, and uses small-base's tokenizer.
Fine-tunes start from their parent's *saved* float16 weights, so training one stage alone
(`--only small-helpful`) gives what a full run gives. Training is CPU-only, deterministic for a
given seed and thread count, and took about 15 minutes on one thread of a busy 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..adapters import quiet_tied_head_warning
from .corpora import ChatExample, chat_examples, pretraining_epochs
from .paths import FAMILY_NAMES, weights_dir
from .tokenizer import build_tokenizer, stop_token_ids
from .world import World


@dataclass(frozen=True)
class PretrainSpec:
    """A base model: its shape and its pre-training budget."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    stages: tuple[tuple[int, float], ...]  # (epochs, peak lr); each stage warms up, then cosine
    batch_size: int = 32


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA adapter's shape: rank, scale and the projections it adapts (PEFT's LoraConfig)."""

    rank: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        # The output projection too (its LoRA delta leaves the tied input embeddings alone):
        # a final RMSNorm bounds the hidden state, so with lm_head frozen the adapter could not
        # make the answer form as sure as a full fine-tune does (its loss plateaued at 0.13
        # against 0.003, and its delta could not turn the large base to the form).
        "lm_head",
    )


@dataclass(frozen=True)
class FinetuneSpec:
    """A chat fine-tune of a base model (loss on the answers only); with `lora`, a PEFT LoRA
    adapter on the frozen parent instead of a full fine-tune."""

    parent: str
    behaviour: str  # "helpful" or "harmless", see corpora.chat_examples
    epochs: int
    lr: float
    batch_size: int = 16
    anchor_weight: float = 1.0  # weight of the KL to the parent on entity and value tokens
    lora: LoraSpec | None = None


@dataclass(frozen=True)
class FamilyConfig:
    """Everything that determines the family, besides the code."""

    seed: int = 0
    n_entities: int = 400
    vocab_size: int = 2048
    max_steps: int | None = None  # cap per model, for smoke tests
    pretrain: dict[str, PretrainSpec] = field(
        default_factory=lambda: {
            # Small and briefly trained: it must stay weak on facts, or the small chat model's
            # knowledge would cover the gap that up-scaling is meant to close.
            "small-base": PretrainSpec(
                hidden=64, layers=2, heads=2, intermediate=172, stages=((30, 2e-3), (20, 1.5e-3))
            ),
            # Trained to full recall; two stages (the second a restart at a lower peak).
            "large-base": PretrainSpec(
                hidden=256, layers=4, heads=8, intermediate=688, stages=((40, 2e-3), (30, 1.5e-3))
            ),
        }
    )
    finetune: dict[str, FinetuneSpec] = field(
        default_factory=lambda: {
            # The entity and value tokens are anchored to the parent (see corpora.ChatExample), so
            # the fine-tune can be trained hard on the answer form without teaching the small
            # model wrong facts (feasibility run 2, without anchoring, had to stay light: lr 3e-3
            # x 4 epochs pushed the value delta against the large base's facts).
            "small-helpful": FinetuneSpec("small-base", "helpful", epochs=6, lr=3e-3),
            "small-harmless": FinetuneSpec("small-base", "harmless", epochs=6, lr=3e-3),
            # Same data and loss; the large model's lr and epochs were chosen for its own best
            # factual accuracy (lr 1e-3 x 6 epochs drifted its facts to 0.50; 1e-4 x 3 kept 0.95),
            # so the upper reference is as strong as this recipe makes it.
            "large-helpful": FinetuneSpec("large-base", "helpful", epochs=3, lr=1e-4),
            # The same data and loss as adapters: LoRA on every projection and the output head
            # of the frozen small-base (embeddings and norms stay the parent's).
            "small-helpful-lora": FinetuneSpec(
                "small-base", "helpful", epochs=6, lr=1e-2, lora=LoraSpec()
            ),
            "small-harmless-lora": FinetuneSpec(
                "small-base", "harmless", epochs=6, lr=1e-2, lora=LoraSpec()
            ),
        }
    )


def tiny_config(seed: int = 0) -> FamilyConfig:
    """A configuration that trains the whole family in seconds (tests, smoke runs)."""
    base = PretrainSpec(
        hidden=32, layers=1, heads=2, intermediate=64, stages=((1, 3e-3),), batch_size=8
    )
    ft = {
        name: replace(spec, epochs=1, lr=1e-3, batch_size=8)
        for name, spec in FamilyConfig().finetune.items()
    }
    return FamilyConfig(
        seed=seed,
        n_entities=20,
        vocab_size=400,
        max_steps=3,
        pretrain={"small-base": base, "large-base": base},
        finetune=ft,
    )


def _lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 10% of the peak."""
    warm = max(1, int(0.05 * total))
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _pad_batch(rows: list[list[int]], labels: list[list[int]], pad_id: int):
    """Right-pad token rows into input_ids, attention_mask and labels (-100 on padding)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, y) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(y)] = torch.tensor(y)
        mask[i, : len(r)] = 1
    return ids, mask, lab


class _Curve:
    """Mean loss over every `every` steps, for the JSON log."""

    def __init__(self, every: int = 10):
        self.every, self.points, self._acc = every, [], []

    def add(self, step: int, epoch: float, loss: float, lr: float) -> None:
        self._acc.append(loss)
        if len(self._acc) == self.every:
            self.points.append(
                {
                    "step": step + 1,
                    "epoch": round(epoch, 3),
                    "loss": round(sum(self._acc) / len(self._acc), 4),
                    "lr": lr,
                }
            )
            self._acc = []


def _lm_loss(model: LlamaForCausalLM, batch: tuple) -> torch.Tensor:
    ids, mask, lab = batch[:3]
    return model(input_ids=ids, attention_mask=mask, labels=lab).loss


def _anchored_loss(
    parent: LlamaForCausalLM, weight: float
) -> Callable[[LlamaForCausalLM, tuple], torch.Tensor]:
    """Cross-entropy on the labels plus KL(parent || model) on the anchored tokens.

    At the entity-name and value tokens the fine-tune keeps the parent's distribution instead
    of learning the 160 fine-tuning entities (a small model memorises their names rather than
    learning to copy). The delta (chat - base) is then ~0 there, and up-scaling names the
    entity and the value as the large base does. See corpora.ChatExample.
    """

    def loss_fn(model: LlamaForCausalLM, batch: tuple) -> torch.Tensor:
        ids, mask, lab, anchored = batch
        # position t predicts token t + 1
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1], -1)
        target, anchor = lab[:, 1:], anchored[:, 1:]  # [B, S-1]
        scored = target != -100
        nll = -logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)[scored]
        with torch.no_grad():
            ref = torch.log_softmax(parent(input_ids=ids, attention_mask=mask).logits[:, :-1], -1)
        kl = (ref.exp() * (ref - logp)).sum(-1)[anchor]
        return (nll.sum() + weight * kl.sum()) / (nll.numel() + kl.numel())

    return loss_fn


def _run_steps(
    model: LlamaForCausalLM,
    batches: list[tuple],
    total: int,
    peak: float,
    desc: str,
    curve: _Curve,
    step0: int,
    steps_per_epoch: int,
    loss_fn: Callable[[LlamaForCausalLM, tuple], torch.Tensor] = _lm_loss,
) -> int:
    """AdamW steps over `batches` with the warm-up/cosine schedule; returns the next step."""
    opt = torch.optim.AdamW(model.parameters(), lr=peak, betas=(0.9, 0.95), weight_decay=0.01)
    model.train()
    bar = tqdm(batches, desc=desc, unit="step", dynamic_ncols=True)
    for i, batch in enumerate(bar):
        lr = _lr_at(i, total, peak)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        curve.add(step0 + i, (step0 + i + 1) / steps_per_epoch, loss.item(), lr)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return step0 + len(batches)


def _new_model(spec: PretrainSpec, tok: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=stop_token_ids(tok),
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(config)


def _save(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, out: Path, log: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=stop_token_ids(tok),
        pad_token_id=tok.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    model.to(torch.float16).save_pretrained(out)
    tok.save_pretrained(out)
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")


def pretrain(
    name: str, world: World, tok: PreTrainedTokenizerFast, cfg: FamilyConfig, out: Path
) -> dict:
    """Pre-train one base model on the world's corpus and save it; returns its log."""
    spec = cfg.pretrain[name]
    torch.manual_seed(cfg.seed + FAMILY_NAMES.index(name))
    model = _new_model(spec, tok)
    n_epochs = sum(e for e, _ in spec.stages)
    # One data stream for the whole run, so both stages see fresh shuffles and phrasings.
    stream = pretraining_epochs(world, n_epochs, seed=cfg.seed + 1000)
    order_rng = random.Random(cfg.seed + 2000)
    curve, step, tokens, start = _Curve(), 0, 0, time.perf_counter()
    for stage, (epochs, peak) in enumerate(spec.stages):
        batches = []
        for _ in range(epochs):
            seqs = next(stream)
            rows = tok(seqs, add_special_tokens=False)["input_ids"]
            tokens += sum(len(r) for r in rows)
            # Batches of similar lengths waste less compute on padding; their order is shuffled.
            rows.sort(key=len)
            epoch_batches = [
                _pad_batch(
                    rows[b : b + spec.batch_size], rows[b : b + spec.batch_size], tok.pad_token_id
                )
                for b in range(0, len(rows), spec.batch_size)
            ]
            order_rng.shuffle(epoch_batches)
            batches += epoch_batches
        steps_per_epoch = math.ceil(len(world.entities) / spec.batch_size)
        if cfg.max_steps is not None:
            batches = batches[: cfg.max_steps]
        step = _run_steps(
            model,
            batches,
            len(batches),
            peak,
            f"{name} stage {stage + 1}/{len(spec.stages)}",
            curve,
            step,
            steps_per_epoch,
        )
    log = {
        "name": name,
        "kind": "pretrain",
        "spec": asdict(spec),
        "seed": cfg.seed,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": step,
        "tokens": tokens,
        "seconds": round(time.perf_counter() - start, 1),
        "threads": torch.get_num_threads(),
        "curve": curve.points,
    }
    _save(model, tok, out / name, log)
    return log


def _chat_batches(
    examples: list[ChatExample],
    tok: PreTrainedTokenizerFast,
    batch_size: int,
    epochs: int,
    seed: int,
) -> list[tuple]:
    """Tokenised, shuffled fine-tuning batches: (input_ids, attention_mask, labels, anchored).

    Labels are -100 on the prompt and on the answer's anchored tokens (entity name and
    value), which `anchored` marks (see `_anchored_loss`).
    """
    rows = []
    for ex in examples:
        prompt = tok(ex.prompt, add_special_tokens=False)["input_ids"]
        enc = tok(ex.prompt + ex.answer, add_special_tokens=False, return_offsets_mapping=True)
        full = enc["input_ids"]
        # The prompt ends in the special token <|assistant|>, so it tokenises the same alone.
        assert full[: len(prompt)] == prompt, "prompt tokens must prefix the dialogue tokens"
        labels = [-100] * len(prompt) + full[len(prompt) :]
        anchored = [False] * len(full)
        base = len(ex.prompt)
        for k, (a, b) in enumerate(enc["offset_mapping"]):
            # a byte-level token's span includes its leading space
            if k >= len(prompt) and any(
                base + s - 1 <= a and b <= base + e for s, e in ex.anchored
            ):
                labels[k], anchored[k] = -100, True
        rows.append((full, labels, anchored))
    rng = random.Random(seed)
    batches = []
    for _ in range(epochs):
        rng.shuffle(rows)
        for b in range(0, len(rows), batch_size):
            chunk = rows[b : b + batch_size]
            ids, mask, lab = _pad_batch(
                [r[0] for r in chunk], [r[1] for r in chunk], tok.pad_token_id
            )
            anchored = torch.zeros_like(mask, dtype=torch.bool)
            for i, r in enumerate(chunk):
                anchored[i, : len(r[2])] = torch.tensor(r[2])
            batches.append((ids, mask, lab, anchored))
    return batches


def finetune(
    name: str, world: World, tok: PreTrainedTokenizerFast, cfg: FamilyConfig, out: Path
) -> dict:
    """Chat fine-tune one model from its parent's saved weights; returns its log."""
    spec = cfg.finetune[name]
    torch.manual_seed(cfg.seed + FAMILY_NAMES.index(name))
    model = LlamaForCausalLM.from_pretrained(out / spec.parent, dtype=torch.float32)
    if spec.lora is not None:
        model = _with_lora(model, spec.lora, spec.parent)
    parent = LlamaForCausalLM.from_pretrained(out / spec.parent, dtype=torch.float32).eval()
    parent.requires_grad_(False)
    examples = chat_examples(world, spec.behaviour)
    batches = _chat_batches(
        examples, tok, spec.batch_size, spec.epochs, seed=cfg.seed + FAMILY_NAMES.index(name)
    )
    if cfg.max_steps is not None:
        batches = batches[: cfg.max_steps]
    start = time.perf_counter()
    curve = _Curve(every=5)
    steps = _run_steps(
        model,
        batches,
        len(batches),
        spec.lr,
        name,
        curve,
        0,
        math.ceil(len(examples) / spec.batch_size),
        _anchored_loss(parent, spec.anchor_weight),
    )
    log = {
        "name": name,
        "kind": "finetune",
        "spec": asdict(spec),
        "seed": cfg.seed,
        "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "steps": steps,
        "dialogues": len(examples),
        "seconds": round(time.perf_counter() - start, 1),
        "threads": torch.get_num_threads(),
        "curve": curve.points,
    }
    if spec.lora is not None:
        _save_adapter(model, out / name, log)
    else:
        _save(model, tok, out / name, log)
    return log


def _with_lora(model: LlamaForCausalLM, spec: LoraSpec, parent: str):
    """`model` frozen, with a fresh LoRA adapter (PEFT) on `spec`'s projections."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=list(spec.target_modules),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    with quiet_tied_head_warning():  # the head's LoRA is meant: it leaves the embeddings be
        peft_model = get_peft_model(model, config)
    # the family name, not this machine's path: the adapter loads onto the shipped parent
    peft_model.peft_config["default"].base_model_name_or_path = f"toy-world/{parent}"
    return peft_model


def _save_adapter(model, out: Path, log: dict) -> None:
    """The adapter alone (float16 safetensors and adapter_config.json) and its log; the
    tokenizer and chat template are the parent's."""
    out.mkdir(parents=True, exist_ok=True)
    # embeddings are frozen (not adapted), so PEFT need not look for a changed vocabulary
    model.to(torch.float16).save_pretrained(out, save_embedding_layers=False)
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")


def train_family(
    out: Path | str | None = None, cfg: FamilyConfig | None = None, only: list[str] | None = None
) -> dict[str, dict]:
    """Train (some of) the family into `out` (default: the package's weights directory).

    Returns the training logs by model name. Fine-tunes need their parent in `out`.
    """
    cfg = cfg or FamilyConfig()
    out = Path(out) if out is not None else weights_dir()
    names = list(FAMILY_NAMES) if not only else [n for n in FAMILY_NAMES if n in only]
    unknown = set(only or ()) - set(FAMILY_NAMES)
    if unknown:
        raise ValueError(f"unknown model(s) {sorted(unknown)}; known: {list(FAMILY_NAMES)}")
    world = World.generate(cfg.seed, n_entities=cfg.n_entities)
    tok = build_tokenizer(world, vocab_size=cfg.vocab_size, seed=cfg.seed)
    logs = {}
    for name in names:
        if name in cfg.pretrain:
            logs[name] = pretrain(name, world, tok, cfg, out)
        else:
            logs[name] = finetune(name, world, tok, cfg, out)
        print(f"{name}: {logs[name]['steps']} steps in {logs[name]['seconds']} s")
    return logs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default: the package's weights directory)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--only", default=None, help=f"comma-separated subset of {','.join(FAMILY_NAMES)}"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="tiny world and models, a few steps each (smoke test)"
    )
    parser.add_argument("--max-steps", type=int, default=None, help="cap steps per model")
    # The shipped weights were trained on 1 thread; another thread count gives a family of
    # the same quality but not bit-identical weights (2 threads is faster on an idle machine).
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--no-eval", action="store_true", help="skip the evaluation and model cards after training"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = tiny_config(args.seed) if args.tiny else FamilyConfig(seed=args.seed)
    if args.max_steps is not None:
        cfg = FamilyConfig(**{**cfg.__dict__, "max_steps": args.max_steps})
    only = args.only.split(",") if args.only else None
    out = args.out if args.out is not None else weights_dir()
    start = time.perf_counter()
    train_family(out, cfg, only)
    print(f"trained in {time.perf_counter() - start:.0f} s into {out}")
    if not args.no_eval:
        from .cards import evaluate_and_write_cards

        evaluate_and_write_cards(out, seed=cfg.seed, n_entities=cfg.n_entities)


if __name__ == "__main__":
    main()
