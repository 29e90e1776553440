"""The demo's report card: `report.md` (with the run's PNGs) and its short form for the terminal.

Every figure comes from the stage results `lmforge.pipeline.demo` stored in stages/<stage>.json;
nothing here measures a capability (sizes excepted: parameters, bytes on disk, the int8 size).
"""

from __future__ import annotations

import time
from pathlib import Path

from lmforge.io import atomic_write_text

ROWS_CHAT = [("complies", "obeys the system prompt (format or refusal, fact aside)"),
             ("system_prompt", "the reference reply exactly (obeys and knows the fact)"), ("end_of_turn", "ends its turn (end-of-turn token)"),
             ("chat_answers", "answers with the right fact")]


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def chat_table(results: dict) -> list[str]:
    ev = results.get("eval", {})
    models = ev.get("models", [])
    if not models:
        return []
    lines = ["| on `system_prompt` (held out) | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
    for key, label in ROWS_CHAT:
        lines.append(f"| {label} | " + " | ".join(pct(ev["chat"][m].get(key)) for m in models) + " |")
    return lines


def before_after_table(results: dict) -> list[str]:
    """Rows of (capability, without, with) for RAG, tools and few-shot."""
    ev = results.get("eval", {})
    rows = []
    if "rag" in ev:
        r = ev["rag"]
        rows += [(f"unseen entities ({r['n']} questions): right answers", r["closed_book"], r["rag"]),
                 ("unseen entities: confident wrong answers (hallucination)", r["closed_book_hallucination"], r["rag_hallucination"]),
                 ("right RAG answers citing the entity's own document", None, r["citation"])]
        if "rag_extract" in r:  # the model picks a source sentence (rag ask --answer extract)
            rows += [("... answered extractively: right answers", r["closed_book"], r["rag_extract"]),
                     ("... extractively: confident wrong answers", r["closed_book_hallucination"], r["rag_extract_hallucination"]),
                     ("... extractively: right answers citing the entity's own document", None, r["citation_extract"])]
        rows.append((f"entities in no document ({r['n_absent']}): says so", None, r["declined_absent"]))
    if "tools" in ev:
        t = ev["tools"]
        rows += [(f"multiplication, 3-4 by 2-3 digits ({t['n']}): exact product", t["no_tools"], t["tools"]),
                 ("... the calculator was called", None, t["called"])]
    if "tools_before_grpo" in ev:  # without = the model GRPO started from, with = after GRPO
        b, t = ev["tools_before_grpo"], ev["tools"]
        rows += [(f"GRPO on calculator use ({b['model']} -> grpo): exact product with the calculator", b["tools"], t["tools"]),
                 ("... GRPO: the calculator was called", b["called"], t["called"])]
    for task, by_k in ev.get("few_shot", {}).items():
        rows.append((f"`{task}` exact match, k = 0 -> 4 shots", by_k["0"], by_k["4"]))
    if not rows:
        return []
    final = ev.get("final", "")
    head = [f"| capability (model: {final}) | without | with |", "|---|---|---|"]
    return head + [f"| {label} | {pct(a)} | {pct(b)} |" for label, a, b in rows]


def _sizes(out: Path, final: str) -> list[str]:
    import copy

    from lmforge.infer import load_run
    from lmforge.infer.quantize import linear_weight_bytes, quantize_model
    from lmforge.model.params import count_params, format_count

    model, _ = load_run(out / final)
    counts = count_params(model.config)
    disk = (out / final / "model.safetensors").stat().st_size
    fp_linear, _ = linear_weight_bytes(model)
    q_linear, _ = linear_weight_bytes(quantize_model(copy.deepcopy(model), 8))
    int8 = disk - fp_linear + q_linear
    return [f"- parameters: {format_count(counts['total'])} ({counts['total']:,}; {format_count(counts['non_embedding'])} "
            f"without embeddings)", f"- bytes on disk (fp32 safetensors): {disk / 2**20:.1f} MiB; int8 "
            f"(`lmforge quantize --bits 8`): about {int8 / 2**20:.1f} MiB"]


def commands(out: Path, c, shares: dict, results: dict) -> list[str]:
    data, w = out / "data", out / "data" / "world"
    grpo, final = results.get("grpo"), results.get("eval", {}).get("final", "dpo")
    m = lambda stage: f"{c.minutes * shares[stage]:g}m"  # noqa: E731
    return [
        f"lmforge world generate --out {w} --size {c.size} --seed {c.seed}",
        f"lmforge tokenizer train --input {w}/pretrain --vocab-size {c.vocab_size} --pattern digits --out {data}/tokenizer",
        f"lmforge data prepare --input {w}/pretrain --tokenizer {data}/tokenizer --out {data}/shards",
        f"lmforge pretrain --preset {c.preset} --data {data}/shards --batch-size {c.batch_size} --seq-len {c.seq_len} "
        f"--max-time {m('pretrain')} --time-schedule --lr {c.lr} --optimizer {c.optimizer} --out {out}/base",
        f"lmforge sft --run {out}/base --world-dir {w} --max-time {m('sft')} --time-schedule --lr {c.sft_lr} "
        f"--out {out}/sft",
        f"lmforge dpo --run {out}/sft --world-dir {w} --max-time {m('dpo')} --time-schedule --lr {c.dpo_lr} --beta {c.dpo_beta} "
        f"--rpo-alpha {c.dpo_rpo_alpha} "
        f"--out {out}/dpo",
    ] + ([f"lmforge grpo --run {out}/{grpo['start']} --data {grpo['prompts']} --tools calculator --rewards "
          f"{','.join(grpo['rewards'])} --reward-weights {','.join(f'{w:g}' for w in grpo['reward_weights'])} --temperature 0.7 --eval-items 0 --max-time {m('grpo')} --time-schedule --lr {c.grpo_lr} "
          f"--min-lr-ratio 0.1 --out {out}/grpo"] if grpo else []) + [
        f"lmforge rag index --docs {w}/rag/documents.jsonl --db {out}/rag.sqlite",
        f"lmforge eval --run {out}/{final} --world {w} --tasks system_prompt",
    ]


def transcripts(results: dict) -> list[str]:
    ev = results.get("eval", {})
    final = ev.get("final")
    lines = []
    chat = ev.get("chat", {}).get(final, {}).get("examples", [])
    for ex in chat[:2]:
        lines += ["```"] + [f"{m['role']}: {m['content']}" for m in ex["messages"]] + [f"assistant: {ex['reply']}", "```"]
    for ex in ev.get("rag", {}).get("examples", [])[:1]:
        lines += ["```", f"user: {ex['question']}", f"closed book: {ex['closed_book']}",
                  f"with RAG: {ex['rag']}   (cited: {', '.join(ex['citations']) or 'none'})", "```"]
    for ex in ev.get("tools", {}).get("examples", [])[:1]:
        lines += ["```"] + [f"{m['role']}: {m.get('content') or m.get('tool_calls')}" for m in ex["messages"]] + \
                 [f"(exact product: {ex['product']})", "```"]
    return lines


def short(results: dict) -> str:
    """What the terminal shows at the end of `lmforge demo`."""
    return "\n".join(chat_table(results) + [""] + before_after_table(results))


def write_report(out: Path, c, results: dict, shares: dict) -> Path:
    out = Path(out)
    ev = results.get("eval", {})
    timing = " · ".join(f"{s} {r['seconds']:.0f} s" for s, r in results.items() if isinstance(r, dict) and "seconds" in r)
    total = sum(r["seconds"] for r in results.values() if isinstance(r, dict) and "seconds" in r)
    lines = [f"# lmforge demo: report card", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; budget {c.minutes:g} minutes, `{c.preset}` model, "
             f"world of {c.size} (seed {c.seed}). Stage times: {timing}; total {total:.0f} s.", "",
             "## What each stage bought", "", *chat_table(results), "", *before_after_table(results), ""]
    if "base_tasks" in ev:
        lines += ["Pretraining alone (base model, greedy exact match):", "", "| task | items | exact |", "|---|---|---|"]
        lines += [f"| {k} | {r['n']} | {pct(r['exact'])} |" for k, r in ev["base_tasks"].items()] + [""]
    lines += ["## Training curves", ""]
    for stage in ("base", "sft", "dpo", "grpo"):
        for png in ("loss.png", "experts.png"):
            if (out / stage / png).is_file():
                lines += [f"![{stage} {png}]({stage}/{png})", ""]
    pre = results.get("pretrain", {})
    lines += ["## Sizes and speed", ""]
    if ev.get("final"):
        lines += _sizes(out, ev["final"])
    if pre.get("tokens") and pre.get("elapsed"):
        lines.append(f"- pretraining: {pre['step']:,} steps, {pre['tokens']:,} tokens, {pre['tokens'] / pre['elapsed']:,.0f} tokens/s")
    if ev.get("decode_tokens_per_s"):
        lines.append(f"- greedy decoding, one sequence: {ev['decode_tokens_per_s']:,.0f} tokens/s")
    lines += ["", "## Each stage by hand", "", "```bash", *commands(out, c, shares, results), "```", "", "## Transcripts of the final model", "",
              *transcripts(results), "", "## Next", "", "```bash", f"lmforge chat --run {out}/{ev.get('final', 'base')}",
              f"lmforge serve --run {out}/{ev.get('final', 'base')}" + (f" --rag-db {out}/rag.sqlite" if (out / "rag.sqlite").is_file() else ""),
              "```", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
