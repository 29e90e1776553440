"""What the preference and RL stages share: completion log-probs of a batch, preference pairs
read and tokenised, and a seeded batch source of pairs.

    sequence_logps(model, input_ids, loss_mask) -> (summed (B,), per_token (B, T-1))
    read_preferences(path) -> [Preference]      {"prompt", "chosen", "rejected"} (+ "reason", "margin")
                                                 or HH-RLHF {"chosen", "rejected"} transcripts; .jsonl or .jsonl.gz
    hh_pair(record, where) -> (prompt, chosen, rejected) messages of one HH-RLHF line
    tokenize_preferences(render, prefs, max_len) -> [PairRow]
    PairBatches(rows, batch_size, seed, rank, world)  -> dicts of padded tensors, with state_dict()
    check_same_tokenizer(a, b, a_name, b_name)   ValueError naming both hashes
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from lmforge.io import parse_jsonl_line, read_jsonl
from lmforge.train.sampler import EpochOrder, rank_slice


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position without materialising the (B, T, V) log-softmax:
    logit[target] - logsumexp(logits). logits (B, T, V), targets (B, T) -> (B, T) float32."""
    logits = logits.float()
    return logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logps(model, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log pi(token | prefix) over the tokens where loss_mask is 1, and the per-token values.

    input_ids, loss_mask (B, T), right-padded (causal attention: padding after a row's last token
    changes nothing before it). Token t+1 is predicted at position t, so the results are
    (B,) and (B, T-1), the latter 0 where loss_mask[:, 1:] is 0. Needs the logits: model(idx)
    with return_logits (the fused path returns only a mean loss).
    """
    logits, _ = model(input_ids)
    per_token = token_logps(logits[:, :-1], input_ids[:, 1:])  # (B, T-1)
    mask = loss_mask[:, 1:].to(per_token.dtype)
    per_token = per_token * mask
    return per_token.sum(-1), per_token


def check_same_tokenizer(a, b, a_name: str, b_name: str) -> None:
    """A reward model / reference must read the policy's token ids: same tokenizer hash."""
    if a.hash != b.hash:
        raise ValueError(f"tokenizer mismatch: {a_name} has tokenizer {a.hash}, {b_name} has {b.hash}; "
                         f"they must share one tokenizer (train both from the same base)")


# ---- preference data ----

@dataclass
class Preference:
    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]
    reason: str | None = None
    margin: float | None = None
    source: str = ""  # file:line


def _messages(value, role: str, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
        return value
    raise ValueError(f"{where}: expected a string or a non-empty list of {{'role', 'content'}} messages, got {value!r:.60}")


HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def hh_transcript(text, where: str) -> list[dict]:
    """An HH-RLHF transcript "\n\nHuman: ...\n\nAssistant: ..." -> messages (Human -> user)."""
    if not isinstance(text, str) or not text.startswith("\n\nHuman: "):
        raise ValueError(f"{where}: expected an HH-RLHF transcript starting with '\\n\\nHuman: ', got {text!r:.60}")
    parts = HH_TURN.split(text)[1:]  # [role, content, role, content, ...]
    return [{"role": HH_ROLES[role], "content": content} for role, content in zip(parts[::2], parts[1::2])]


def hh_pair(record: dict, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """One HH-RLHF line {"chosen", "rejected"} (two full transcripts) -> (prompt, chosen, rejected):
    the turns both share, then each one's last assistant turn. The two must differ only there."""
    chosen = hh_transcript(record["chosen"], f"{where}: field 'chosen'")
    rejected = hh_transcript(record["rejected"], f"{where}: field 'rejected'")
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1]["role"] != "assistant":
            raise ValueError(f"{where}: field '{name}' does not end with an Assistant turn "
                             f"(it ends with a Human turn: {turns[-1]['content']!r:.40})")
    if chosen[:-1] != rejected[:-1]:
        at = next((i for i, (c, r) in enumerate(zip(chosen, rejected)) if c != r), min(len(chosen), len(rejected)) - 1)
        raise ValueError(f"{where}: 'chosen' and 'rejected' do not share the conversation before their last Assistant "
                         f"turn (they differ at turn {at + 1}: {len(chosen)} vs {len(rejected)} turns)")
    return chosen[:-1], chosen[-1:], rejected[-1:]


def _records(path: str | Path):
    """(line number, record) of a .jsonl or gzip-compressed .jsonl.gz file."""
    if not str(path).endswith(".gz"):
        yield from read_jsonl(path)
        return
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield lineno, parse_jsonl_line(line, path, lineno)


def read_preferences(path: str | Path) -> list[Preference]:
    """{"prompt", "chosen", "rejected"} lines (strings or message lists; chosen/rejected are the
    assistant's replies), optional "reason" (str) and "margin" (number); or HH-RLHF lines
    {"chosen", "rejected"} holding two full transcripts (hh_pair). .jsonl or .jsonl.gz; errors
    name file:line."""
    out = []
    for lineno, record in _records(path):
        where = f"{path}:{lineno}"
        if "prompt" not in record and isinstance(record.get("chosen"), str) and isinstance(record.get("rejected"), str) \
                and record["chosen"].startswith("\n\nHuman: "):
            out.append(Preference(*hh_pair(record, where), record.get("reason"), None, where))
            continue
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
        if missing:
            raise ValueError(f"{where}: missing field {', '.join(repr(k) for k in missing)} "
                             f"(a preference line needs 'prompt', 'chosen' and 'rejected', or HH-RLHF 'chosen' and 'rejected' transcripts; found: {', '.join(record) or 'none'})")
        margin = record.get("margin")
        if margin is not None and not isinstance(margin, (int, float)):
            raise ValueError(f"{where}: field 'margin' must be a number, got {margin!r}")
        out.append(Preference(_messages(record["prompt"], "user", f"{where}: field 'prompt'"),
                              _messages(record["chosen"], "assistant", f"{where}: field 'chosen'"),
                              _messages(record["rejected"], "assistant", f"{where}: field 'rejected'"),
                              record.get("reason"), None if margin is None else float(margin), where))
    if not out:
        raise ValueError(f"{path}: no preference pairs")
    return out


@dataclass
class PairRow:
    chosen_ids: list[int]
    chosen_mask: list[int]  # 1 on the completion's tokens (what log-probs and rewards are about)
    rejected_ids: list[int]
    rejected_mask: list[int]
    margin: float = 0.0
    reason: str | None = None
    prompt_len: int = 0


def _completion(render: Callable, prompt: list[dict], reply: list[dict], max_len: int, where: str) -> tuple[list[int], list[int], int]:
    prompt_ids = render(prompt, add_generation_prompt=True)[0]
    ids, mask = render(prompt + reply)
    if ids[:len(prompt_ids)] != prompt_ids:
        raise ValueError(f"{where}: the rendered conversation does not start with the rendered prompt (chat template not prefix-stable)")
    completion = [int(m and i >= len(prompt_ids)) for i, m in enumerate(mask)]
    if not any(completion):
        raise ValueError(f"{where}: the reply renders to no supervised tokens")
    if len(ids) > max_len:  # keep the end of the prompt and the start of the reply
        cut = max(0, min(len(prompt_ids) - max_len // 2, len(ids) - max_len))
        ids, completion = ids[cut:cut + max_len], completion[cut:cut + max_len]
    return ids, completion, len(prompt_ids)


def tokenize_preferences(render: Callable, prefs: list[Preference], max_len: int) -> list[PairRow]:
    rows = []
    for p in prefs:
        c_ids, c_mask, n_prompt = _completion(render, p.prompt, p.chosen, max_len, p.source)
        r_ids, r_mask, _ = _completion(render, p.prompt, p.rejected, max_len, p.source)
        rows.append(PairRow(c_ids, c_mask, r_ids, r_mask, p.margin or 0.0, p.reason, n_prompt))
    return rows


def collate_pairs(rows: list[PairRow], pad_id: int, device="cpu") -> dict:
    """B pairs -> input_ids, loss_mask (2B, T) right-padded, chosen rows first; last_index (2B,)
    of each row's last real token; margin (B,); chosen_lengths / rejected_lengths (B,)."""
    seqs = [r.chosen_ids for r in rows] + [r.rejected_ids for r in rows]
    masks = [r.chosen_mask for r in rows] + [r.rejected_mask for r in rows]
    ids, mask = pad_rollouts(seqs, masks, pad_id, device)
    lengths = mask[:, 1:].sum(1).float()
    return {"input_ids": ids, "loss_mask": mask,
            "last_index": torch.tensor([len(s) - 1 for s in seqs], device=device),
            "margin": torch.tensor([r.margin for r in rows], dtype=torch.float, device=device),
            "chosen_lengths": lengths[:len(rows)], "rejected_lengths": lengths[len(rows):]}


class PairBatches:
    """Endless batches of pairs, reshuffled each epoch (seeded); under DDP rank r takes pairs
    [r*B, (r+1)*B) of each global batch. `extra(indices) -> dict` adds per-pair tensors (DPO's
    precomputed reference log-probs). state_dict(): (epoch, position)."""

    def __init__(self, rows: list[PairRow], batch_size: int, pad_id: int, seed: int = 0, rank: int = 0, world: int = 1,
                 device="cpu", extra: Callable[[list[int]], dict] | None = None):
        if not rows:
            raise ValueError("no preference pairs to train on")
        self.rows, self.batch_size, self.pad_id = rows, batch_size, pad_id
        self.rank, self.world, self.device, self.extra = rank, world, device, extra
        self.order = EpochOrder(len(rows), seed)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        mine = rank_slice(self.order.take(self.batch_size * self.world), self.rank, self.batch_size)
        batch = collate_pairs([self.rows[i] for i in mine], self.pad_id, self.device)
        if self.extra is not None:
            batch.update(self.extra(mine))
        return batch

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)


def pad_rollouts(seqs: list[list[int]], masks: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled sequences and their completion masks -> (ids, mask) (N, T), right-padded."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(m)] = torch.tensor(m)
    return ids.to(device), mask.to(device)


def split_heldout(items: list, n_eval: int, seed: int) -> tuple[list, list]:
    """(train, heldout): a seeded shuffle, the first n_eval held out."""
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    return [items[i] for i in order[n_eval:]], [items[i] for i in order[:n_eval]]
