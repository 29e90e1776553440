"""Supervised fine-tuning: next-token loss on what the assistant says, nothing else.

The base is an lmforge run or an HF checkpoint directory (load_base); the data `messages` JSONL
(OpenAI/TRL, tool calls) or {prompt, completion} JSONL (read_conversations; errors name file:line).
Packing (pack, on by default, best-fit decreasing) lays examples end to end; segment_ids give a
block-diagonal causal mask and positions restart per example, so packed logits equal unpacked ones. The loss is the
token losses' sum over the *global* batch's supervised-token count, so N processes with B rows
take the same step as one with N*B rows (sft_objective). sft() is the stage, full or LoRA, and
writes a run directory (docs/alignment.md, *SFT*).
"""

from __future__ import annotations

import bisect
import copy
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from lmforge.data.chat_template import chat_renderer, write_tokenizer_config
from lmforge.infer import load_model_dir
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.data.world import generate
from lmforge.io import atomic_write_json, read_json, read_jsonl
from lmforge.model.lora import DEFAULT_TARGETS, LoRAConfig, apply_lora, merge_lora, save_adapter
from lmforge.model.pretrained import save_pretrained
from lmforge.tokenizer import Tokenizer
from lmforge.train.distributed import barrier, setup_distributed
from lmforge.train.loop import TrainConfig, train
from lmforge.train.sampler import EpochOrder, rank_slice

IGNORE = -100


# LoRA's lr when none is given: ~10x full fine-tuning's ("LoRA Without Regret", Thinking Machines
# 2025: the best LoRA lr is ~10x full FT's with alpha fixed at 32 and the 1/rank factor, across
# ranks); the demo's small base wants more (docs/alignment.md)
SFT_LORA_LR = 1e-3


@dataclass
class SFTConfig:
    data: tuple[str, ...] = field(default=(), metadata={"help": "JSONL files of conversations (messages or prompt/completion); empty: the world's chat/sft.jsonl + chat/tools.jsonl"})
    world_dir: str | None = field(default=None, metadata={"help": "built-in world directory (generated there, small, when absent); none: OUT/world"})
    seq_len: int | None = field(default=None, metadata={"help": "tokens per training row, longer examples are cut; none: the model's block_size"})
    batch_size: int = field(default=8, metadata={"help": "rows per process per micro-batch"})
    packing: bool = field(default=True, metadata={"help": "pack short examples into full rows (no attention across examples)"})
    eval_examples: int = field(default=64, metadata={"help": "held-out conversations (loss and end-of-turn rate)"})
    eot_max_tokens: int = field(default=96, metadata={"help": "greedy tokens per held-out answer for the end-of-turn rate"})
    lora_rank: int = field(default=0, metadata={"help": f"LoRA rank (0: full fine-tuning); with LoRA --lr defaults to {SFT_LORA_LR:g}"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (scaling alpha/rank; a fixed alpha keeps the best lr about the same across ranks)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    lora_targets: tuple[str, ...] | None = field(default=None, metadata={"help": "Linear names LoRA wraps; none: the attention "
                                                 "and MLP projections, plus lm_head on an lmforge base with an untied head"})
    lora_trainable_tokens: str | None = field(default=None, metadata={"help": "embedding rows trained beside LoRA (PEFT's "
                                              "trainable_token_indices): 'special' (the tokenizer's special tokens), 'none', or "
                                              "token ids a,b,c; none: 'special' on an lmforge base with an untied head, else 'none'"})
    lora_modules_to_save: tuple[str, ...] = field(default=(), metadata={"help": "modules trained in full beside LoRA and "
                                                   "saved with the adapter (PEFT's modules_to_save), e.g. embed_tokens"})


# defaults of the loop's settings for SFT where pretraining's do not fit (the CLI's flags override them)
SFT_TRAIN_DEFAULTS = {"max_steps": 200, "lr": 1e-4, "warmup_steps": 10, "min_lr_ratio": 0.0, "eval_interval": 100,
                      "ckpt_interval": 100, "weight_decay": 0.0}


def sft_train_defaults(lora_rank: int = 0) -> dict:
    """SFT_TRAIN_DEFAULTS, with lr = SFT_LORA_LR when LoRA trains (lora_rank > 0)."""
    return {**SFT_TRAIN_DEFAULTS, **({"lr": SFT_LORA_LR} if lora_rank else {})}


def resolve_lora(config: SFTConfig, hf_base: bool, tied_head: bool, special_ids: tuple[int, ...] = ()) -> LoRAConfig:
    """The LoRAConfig SFT applies: targets none -> DEFAULT_TARGETS, plus lm_head, and the special
    tokens' embedding rows trained, on an lmforge base whose head is not tied to the embedding.
    Such a base was pretrained on plain text and never saw <|end|> or <|assistant|>: without
    lm_head the projections barely move those logits and the loss stalls (3.44 vs full SFT's 0.80
    on the demo's small), and without their embedding rows the model cannot read them
    (docs/alignment.md, *LoRA*). An HF base keeps PEFT's convention (neither): its chat tokens are trained."""
    targets = config.lora_targets
    own_base = not hf_base and not tied_head
    if targets is None:
        targets = DEFAULT_TARGETS + (("lm_head",) if own_base and "lm_head" not in config.lora_modules_to_save else ())
    full_embedding = "embed_tokens" in config.lora_modules_to_save
    choice = config.lora_trainable_tokens or ("special" if own_base and not full_embedding else "none")
    if choice == "special":
        tokens = tuple(special_ids)
    elif choice == "none":
        tokens = ()
    else:
        try:
            tokens = tuple(int(t) for t in choice.split(","))
        except ValueError:
            raise ValueError(f"lora_trainable_tokens={choice!r}: expected 'special', 'none' or token ids like 3,4,5") from None
    return LoRAConfig(config.lora_rank, config.lora_alpha, config.lora_dropout, tuple(targets), trainable_tokens=tokens,
                      modules_to_save=tuple(config.lora_modules_to_save))


# ---- data ----

def _as_messages(value, role: str, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return value
    raise ValueError(f"{where}: expected a string or a list of messages, got {type(value).__name__}")


def read_conversations(path: str | Path) -> list[list[dict]]:
    """`{"messages": [...]}` or `{"prompt": ..., "completion": ...}` lines (strings or message
    lists) -> conversations; each must end with an assistant turn (what SFT trains on)."""
    out = []
    for lineno, record in read_jsonl(path):
        where = f"{path}:{lineno}"
        if "messages" in record:
            messages = _as_messages(record["messages"], "user", f"{where}: field 'messages'")
        elif "prompt" in record and "completion" in record:
            messages = (_as_messages(record["prompt"], "user", f"{where}: field 'prompt'")
                        + _as_messages(record["completion"], "assistant", f"{where}: field 'completion'"))
        else:
            raise ValueError(f"{where}: expected a 'messages' field or 'prompt' and 'completion' fields (found: {', '.join(record) or 'none'})")
        if not messages or messages[-1].get("role") != "assistant":
            last = messages[-1].get("role") if messages else "no"
            raise ValueError(f"{where}: the conversation ends with {last!r} turn; SFT needs it to end with the assistant's reply")
        out.append(messages)
    if not out:
        raise ValueError(f"{path}: no conversations")
    return out


def tokenize(render: Callable, conversations: list[list[dict]], sources: list[str] | None = None) -> list[tuple[list[int], list[int]]]:
    """Each conversation -> (ids, loss mask); a rendering error names its conversation."""
    examples = []
    for i, messages in enumerate(conversations):
        try:
            examples.append(render(messages))
        except ValueError as e:
            raise ValueError(f"{sources[i] if sources else f'conversation {i}'}: {e}") from None
    return examples


def _pairs(example, seq_len: int) -> tuple[list[int], list[int]]:
    """(ids, mask) -> (inputs, targets) shifted by one, cut to seq_len; unsupervised targets = -100."""
    ids, mask = example
    inputs = ids[:-1][:seq_len]
    targets = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])][:seq_len]
    return inputs, targets


def pack(examples, seq_len: int, pad_id: int) -> list[dict]:
    """Examples into rows of seq_len tokens by best-fit decreasing (TRL's `bfd`): longest first,
    each into the fullest row it still fits, else a new row; a row holds whole examples only.
    Deterministic: ties go to the earlier example and the earlier row. Each row: idx, targets,
    positions (restarting per example), segment_ids (example index in the row; padding gets its own)."""
    pairs = [_pairs(ex, seq_len) for ex in examples]
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted: the first fit is the best fit
    for i in order:
        need = len(pairs[i][0])
        at = bisect.bisect_left(free, (need, -1))
        if at == len(free):
            bins.append([i])
            bisect.insort(free, (seq_len - need, len(bins) - 1))
        else:
            room, b = free.pop(at)
            bins[b].append(i)
            bisect.insort(free, (room - need, b))
    rows = []
    for members in bins:
        idx, tgt, pos, seg = [], [], [], []
        for s, i in enumerate(members):
            inp, t = pairs[i]
            idx += inp
            tgt += t
            pos += list(range(len(inp)))
            seg += [s] * len(inp)
        n_pad = seq_len - len(idx)
        rows.append({"idx": idx + [pad_id] * n_pad, "targets": tgt + [IGNORE] * n_pad,
                     "positions": pos + [0] * n_pad, "segment_ids": seg + [len(members)] * n_pad, "length": len(idx)})
    return rows


def pad_rows(examples, seq_len: int, pad_id: int) -> list[dict]:
    """One example per row, right-padded to seq_len (no packing)."""
    rows = []
    for ex in examples:
        inp, tgt = _pairs(ex, seq_len)
        n_pad = seq_len - len(inp)
        rows.append({"idx": inp + [pad_id] * n_pad, "targets": tgt + [IGNORE] * n_pad, "length": len(inp)})
    return rows


def collate(rows: list[dict], n_global: int, world: int, device) -> dict:
    """Rows -> tensors (B, T); `norm` = supervised tokens in the global batch / world size,
    `n_real` = tokens that are not padding (for tokens/s)."""
    batch = {k: torch.tensor([r[k] for r in rows], device=device) for k in rows[0] if k != "length"}
    batch["n_real"] = sum(r["length"] for r in rows)
    batch["norm"] = max(n_global, 1) / world
    return batch


class SFTBatches:
    """Endless batches of rows, reshuffled each epoch (seeded); under DDP rank r takes rows
    [r*B, (r+1)*B) of each global batch of world*B rows. state_dict(): (epoch, position)."""

    def __init__(self, rows: list[dict], batch_size: int, seed: int = 0, rank: int = 0, world: int = 1, device="cpu"):
        if not rows:
            raise ValueError("no training rows")
        self.rows, self.batch_size, self.rank, self.world, self.device = rows, batch_size, rank, world, device
        self.order = EpochOrder(len(rows), seed)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rows = [self.rows[i] for i in self.order.take(self.batch_size * self.world)]
        n_global = sum(t != IGNORE for r in rows for t in r["targets"])
        return collate(rank_slice(rows, self.rank, self.batch_size), n_global, self.world, self.device)

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)


def sft_objective(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Sum of the supervised tokens' cross-entropy / (global supervised tokens / world).
    metrics: n_tokens (non-padding tokens, for tokens/s), supervised_tokens, sft_loss (this rank's mean)."""
    targets = batch["targets"]
    n_local = int((targets != IGNORE).sum())
    if n_local == 0:  # every target of this rank's rows was cut away: a zero loss that still touches every weight
        _, loss = model(batch["idx"], targets=batch["idx"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
                        return_logits=False)
        return loss * 0.0, {"n_tokens": batch["n_real"], "supervised_tokens": 0}
    _, mean = model(batch["idx"], targets=targets, positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
                    return_logits=False)
    return mean * (n_local / batch["norm"]), {"n_tokens": batch["n_real"], "supervised_tokens": n_local, "sft_loss": mean.detach()}


# ---- the base model ----

@dataclass
class Base:
    model: torch.nn.Module
    tokenizer: Tokenizer
    render: Callable  # messages, add_generation_prompt=False -> (ids, mask)
    end_id: int  # the assistant's end-of-turn token
    hf: bool  # a Hugging Face checkpoint directory (its own chat template)
    path: Path


def load_base(path: str | Path, device="cpu") -> Base:
    """An lmforge run directory or a local HF checkpoint directory (config.json with model_type,
    safetensors, tokenizer.json, tokenizer_config.json with a chat_template)."""
    path = Path(path)
    model, tokenizer, hf = load_model_dir(path, device=device)
    render = chat_renderer(path, tokenizer)
    if hf:
        tok_config = read_json(path / "tokenizer_config.json")
        eos = tok_config.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        end_id = tokenizer.special_tokens.get(eos, tokenizer.eos_id)
    else:
        end_id = tokenizer.special_tokens.get("<|end|>")
    if end_id is None:
        raise ValueError(f"{path}: the tokenizer has no end-of-turn token (<|end|>, or tokenizer_config.json's eos_token)")
    return Base(model.float(), tokenizer, render, end_id, hf, path)


# ---- evaluation ----

def heldout_loss(model, rows: list[dict], batch_size: int, device) -> float:
    """Mean cross-entropy over the held-out rows' supervised tokens."""
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = collate(rows[i:i + batch_size], 1, 1, device)
        n = int((batch["targets"] != IGNORE).sum())
        if n:
            _, mean = model(batch["idx"], targets=batch["targets"], positions=batch.get("positions"),
                            segment_ids=batch.get("segment_ids"), return_logits=False)
            total, count = total + mean.item() * n, count + n
    return total / max(count, 1)


def end_of_turn_rate(model, base: Base, conversations: list[list[dict]], max_new_tokens: int) -> dict:
    """Greedy answers to held-out prompts (each conversation minus its last assistant turn): the
    share that end with the end-of-turn token before max_new_tokens, and the answers."""
    raw = getattr(model, "module", model)
    if getattr(raw, "lora_config", None) is not None:  # the engine's fast paths read plain Linear weights
        raw = merge_lora(copy.deepcopy(raw))
    engine = Engine(raw.eval(), base.tokenizer)
    prompts = [base.render(c[:-1], add_generation_prompt=True)[0] for c in conversations]
    fits = [len(p) < raw.config.block_size for p in prompts]  # a prompt over the context has no answer to score
    conversations = [c for c, f in zip(conversations, fits) if f]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=[base.end_id])
    out = engine.generate([p for p, f in zip(prompts, fits) if f], params)
    ended = [c.finish_reason == "stop" for c in out]
    return {"eot_rate": sum(ended) / max(len(ended), 1), "skipped_over_context": fits.count(False),
            "answers": [{"prompt": c[-2].get("content"), "reference": c[-1].get("content"), "answer": o.text}
                        for c, o in zip(conversations, out)]}


# ---- the stage ----

def default_data(world_dir: Path, seed: int = 0) -> list[Path]:
    """The world's chat/sft.jsonl + chat/tools.jsonl (+ chat/grounded.jsonl, which worlds written
    before it existed lack), generated (small) when absent."""
    files = [world_dir / "chat" / "sft.jsonl", world_dir / "chat" / "tools.jsonl"]
    if not all(f.is_file() for f in files):
        generate(world_dir, size="1MB", seed=seed, progress=False)
    grounded = world_dir / "chat" / "grounded.jsonl"
    return files + ([grounded] if grounded.is_file() else [])


def _data_files(config: SFTConfig, out: Path, seed: int, rank: int) -> list[Path]:
    """config.data, else the world's chat files (generated once by rank 0, then read by every rank)."""
    if config.data:
        return [Path(p) for p in config.data]
    world_dir = Path(config.world_dir) if config.world_dir else out / "world"
    if rank == 0:
        default_data(world_dir, seed)
    barrier()
    return default_data(world_dir, seed)


def read_conversation_files(files: list[Path]) -> tuple[list, list[str]]:
    """Every conversation of `files`, and each one's "file: conversation N" (for error messages)."""
    conversations, sources = [], []
    for f in files:
        convs = read_conversations(f)
        conversations += convs
        sources += [f"{f}: conversation {i + 1}" for i in range(len(convs))]
    return conversations, sources


def _split_conversations(files: list[Path], eval_examples: int, seed: int) -> tuple[list, list[str], list]:
    """(training conversations, their "file: conversation N" sources, held-out conversations):
    a seeded shuffle, at most eval_examples and a tenth of all held out."""
    conversations, sources = read_conversation_files(files)
    order = torch.randperm(len(conversations), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = min(eval_examples, len(conversations) // 10)
    return ([conversations[i] for i in order[n_eval:]], [sources[i] for i in order[n_eval:]],
            [conversations[i] for i in order[:n_eval]])


def sft(base_path: str | Path, out: str | Path, config: SFTConfig | None = None, train_config: TrainConfig | None = None,
        resume: bool = False, progress: bool = True, log=print) -> dict:
    """Fine-tune the model in `base_path` on conversations; write the run directory `out`.

    Full fine-tuning writes model.safetensors; LoRA (config.lora_rank > 0) also writes
    adapter_model.safetensors + adapter_config.json (base_model_name_or_path = base_path), and
    model.safetensors holds the merged weights so generate/chat/serve read the run as any other.
    """
    config = config or SFTConfig()
    train_config = train_config or TrainConfig(**sft_train_defaults(config.lora_rank))
    out = Path(out)
    rank, world, device = setup_distributed()
    base = load_base(base_path, device=device)
    seq_len = config.seq_len or base.model.config.block_size
    if seq_len > base.model.config.block_size:
        raise ValueError(f"seq_len={seq_len} exceeds the model's block_size={base.model.config.block_size}")

    files = _data_files(config, out, train_config.seed, rank)
    train_convs, train_sources, heldout = _split_conversations(files, config.eval_examples, train_config.seed)
    examples = tokenize(base.render, train_convs, train_sources)
    eval_examples = tokenize(base.render, heldout)
    pad_id = base.tokenizer.pad_id if base.tokenizer.pad_id is not None else base.end_id
    make_rows = pack if config.packing else pad_rows
    rows, eval_rows = make_rows(examples, seq_len, pad_id), make_rows(eval_examples, seq_len, pad_id)

    model = base.model
    if config.lora_rank:
        special_ids = tuple(sorted(getattr(base.tokenizer, "special_tokens", {}).values()))
        lora = resolve_lora(config, base.hf, model.config.tie_embeddings, special_ids)
        config = replace(config, lora_targets=lora.targets,  # sft_config.json: what ran
                         lora_trainable_tokens=",".join(map(str, lora.trainable_tokens)) or "none")
        apply_lora(model, lora)
    data = SFTBatches(rows, config.batch_size, seed=train_config.seed, rank=rank, world=world, device=device)
    resolved = {"base": str(base_path), "hf_base": base.hf, "sft": asdict(config), "train": asdict(train_config),
                "data": [str(f) for f in files], "seq_len": seq_len, "train_examples": len(examples), "heldout": len(heldout),
                "rows": len(rows), "world_size": world,
                "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "sft_config.json", resolved)
        write_tokenizer_files(base, out)
    log(json.dumps(resolved))

    def evaluate(m):
        return {"heldout_loss": heldout_loss(m, eval_rows, config.batch_size, device)} if eval_rows else {}

    train_config.progress = train_config.progress and progress
    t0 = time.time()
    summary = train(model, sft_objective, data, train_config, out, evaluate=evaluate, resume=resume)
    summary["wall_time"] = time.time() - t0
    model.eval()
    eot = None
    if heldout:
        with torch.no_grad():
            eot = end_of_turn_rate(model, base, heldout, config.eot_max_tokens)
        summary["eot_rate"] = eot["eot_rate"]
    if rank == 0:
        _write_outputs(model, out, base_path, config, summary, eot)
    if dist.is_initialized():
        dist.barrier()
    return summary


def _write_outputs(model, out: Path, base_path, config: SFTConfig, summary: dict, eot: dict | None) -> None:
    """LoRA's adapter files and merged weights, sft_eval.json (when there was a held-out split), summary.json."""
    if config.lora_rank:
        save_adapter(model, out, base=str(Path(base_path).resolve()))
        save_pretrained(merge_lora(copy.deepcopy(model)), out)  # the run dir's weights: merged
    if eot is not None:
        atomic_write_json(out / "sft_eval.json", {"heldout_loss": summary.get("heldout_loss"), **eot})
    atomic_write_json(out / "summary.json", summary)


def write_tokenizer_files(base: Base, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json: lmforge's template, or the HF base's own files."""
    if base.hf:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            if (base.path / name).is_file():
                (out / name).write_bytes((base.path / name).read_bytes())
    else:
        base.tokenizer.save(out)
        write_tokenizer_config(base.tokenizer, out, base.model.config.block_size)
