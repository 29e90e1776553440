"""`lmforge demo`: the whole life of a small LLM, each stage one call of the library function its
own CLI verb calls (no second implementation of anything):

    data      the built-in world -> a BPE tokenizer -> token shards     (prepare_world_data)
    pretrain  next-token prediction, `small`, for its share of the time  (train.pretrain.pretrain)
    sft       chat, tool and grounded-answer dialogues                   (train.sft.sft)
    dpo       the world's preference pairs                               (train.dpo.dpo)
    grpo      (when chosen) calculator use, verifiable reward, tool loop (train.grpo.grpo)
    rag       a SQLite index of the unseen entities' articles            (prompting.rag.index)
    eval      what each stage bought, on held-out sets                   (eval.capabilities, eval.tasks)
    report    report.md + its PNGs, printed in short                     (pipeline.report)

Layout of `out`: data/{world,tokenizer,shards}, base/, sft/, dpo/, grpo/ (ordinary run directories),
rag.sqlite, stages/<stage>.json (a finished stage's result: a second demo into the same directory
skips it), report.md. A training stage that was interrupted (Ctrl-C, a crash) has checkpoints in
its run directory and the next demo resumes it there; its time budget counts the time already spent.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmforge.infer import load_run
from lmforge.infer.engine import Engine
from lmforge.io import atomic_write_json, read_json
from lmforge.pipeline.world_data import DIGITS_PATTERN, SAMPLE_PROMPTS, prepare_world_data
from lmforge.train.loop import TrainConfig

STAGES = ("data", "pretrain", "sft", "dpo", "grpo", "rag", "eval", "report")
DEFAULT_STAGES = tuple(s for s in STAGES if s != "grpo")  # GRPO is chosen with --stages (it adds its share)
# each training stage's share of --minutes; the rest (about a fifth) is data, indexing, evaluation
SHARES = {"pretrain": 0.48, "sft": 0.2, "dpo": 0.1, "grpo": 0.1}
# steps between checkpoints of each training stage: what an interrupted stage resumes from
CKPT_INTERVAL = {"pretrain": 500, "sft": 200, "dpo": 200, "grpo": 20}
# GRPO's rewards on calculator use: the right final product, a call that returned it, a reply that reports the result
GRPO_REWARDS, GRPO_REWARD_WEIGHTS = ("answer", "tool_result", "tool_copy"), (1.0, 0.5, 0.5)
# the sets a pretrained model can answer, scored on the base model
BASE_TASKS = ("addition_2digit", "translation_4shot", "arithmetic", "fewshot")


@dataclass
class DemoConfig:
    """The demo's dials; `lmforge demo` has one flag per field (lmforge.cli.config_flags)."""

    minutes: float = field(default=15.0, metadata={"help": "the whole demo's time budget in minutes: "
                                                            + ", ".join(f"{s} {share:.0%}" for s, share in SHARES.items())
                                                            + " (when chosen); data, RAG index and evaluation take the rest"})
    stages: tuple[str, ...] = field(default=DEFAULT_STAGES, metadata={"help": f"stages to run, of: {', '.join(STAGES)} "
                                                                               "(a stage needs those before it to have run "
                                                                               "once; grpo is not in the default)"})
    size: str = field(default="10MB", metadata={"help": "bytes of world text to generate"})
    seed: int = field(default=0, metadata={"help": "world and training seed"})
    preset: str = field(default="small", metadata={"help": "model preset"})
    vocab_size: int = field(default=4096, metadata={"help": "BPE vocabulary size"})
    batch_size: int = field(default=4, metadata={"help": "sequences per pretraining step"})
    seq_len: int = field(default=256, metadata={"help": "tokens per pretraining sequence (256: a RAG prompt with three "
                                                                      "sources is about 200 tokens)"})
    lr: float = field(default=3e-3, metadata={"help": "peak AdamW learning rate (embeddings, head, norms with Muon)"})
    warmup_steps: int = field(default=20, metadata={"help": "warmup steps"})
    optimizer: str = field(default="muon", metadata={"help": "muon: Muon on the hidden matrices + AdamW on the rest",
                                                     "choices": ["muon", "adamw"]})
    muon_lr: float = field(default=0.02, metadata={"help": "Muon learning rate"})
    sft_lr: float = field(default=5e-4, metadata={"help": "SFT learning rate"})
    dpo_lr: float = field(default=5e-6, metadata={"help": "DPO learning rate"})
    dpo_beta: float = field(default=0.1, metadata={"help": "DPO beta"})
    dpo_rpo_alpha: float = field(default=1.0, metadata={"help": "weight of the chosen replies' NLL in DPO (RPO), "
                                                                "which keeps what SFT taught from drifting"})
    grpo_lr: float = field(default=1e-4, metadata={"help": "GRPO learning rate"})
    eval_items: int = field(default=100, metadata={"help": "items per evaluation set"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})

    def __post_init__(self):
        if self.minutes <= 0:
            raise ValueError(f"minutes={self.minutes} must be more than 0")
        self.stages = tuple(self.stages)
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage {unknown[0]!r}; choose from: {', '.join(STAGES)}")


@dataclass
class _Demo:
    out: Path
    config: DemoConfig
    log: callable

    @property
    def world_dir(self) -> Path:
        return self.out / "data" / "world"

    def seconds(self, stage: str) -> float:
        return self.config.minutes * 60 * SHARES[stage]

    def train_config(self, stage: str, **kw) -> TrainConfig:
        """A time-bounded schedule (cosine over the stage's share), checkpoints for Ctrl-C."""
        c = self.config
        return TrainConfig(max_steps=1_000_000, max_time=self.seconds(stage), time_schedule=True, seed=c.seed,
                           eval_interval=0, log_interval=10, ckpt_interval=CKPT_INTERVAL[stage], progress=c.progress, **kw)


def _run_data(d: _Demo) -> dict:
    c, timings = d.config, {}
    prepare_world_data(d.out / "data", c.size, c.vocab_size, c.seed, c.progress, pattern=DIGITS_PATTERN,
                       n_eval=max(c.eval_items, 100), log=d.log, timings=timings)
    return {"timings": timings}


def _run_pretrain(d: _Demo) -> dict:
    from lmforge.train.pretrain import DataConfig, RunConfig, pretrain

    c = d.config
    run = RunConfig(
        preset=c.preset,
        data=DataConfig(path=str(d.out / "data" / "shards"), batch_size=c.batch_size, seq_len=c.seq_len, eval_windows=64,
                        sample_prompt=SAMPLE_PROMPTS[0], sample_tokens=8),
        train=d.train_config("pretrain", lr=c.lr, warmup_steps=c.warmup_steps, optimizer=c.optimizer,
                             muon_lr=c.muon_lr),
    )
    summary = pretrain(run, d.out / "base", resume=True, progress=c.progress)
    return {k: summary.get(k) for k in ("step", "tokens", "loss", "val_loss", "elapsed", "stop_reason")}


def _run_sft(d: _Demo) -> dict:
    from lmforge.train.sft import SFTConfig, sft

    c = d.config
    config = SFTConfig(world_dir=str(d.world_dir), batch_size=8, eval_examples=32, eot_max_tokens=64)
    summary = sft(d.out / "base", d.out / "sft", config, d.train_config("sft", lr=c.sft_lr, warmup_steps=10, min_lr_ratio=0.0,
                                                                      weight_decay=0.0),
                  resume=True, progress=c.progress, log=lambda msg: None)
    return _summary(summary)


def _run_dpo(d: _Demo) -> dict:
    from lmforge.train.dpo import DPOConfig, dpo

    c = d.config
    config = DPOConfig(world_dir=str(d.world_dir), beta=c.dpo_beta, rpo_alpha=c.dpo_rpo_alpha, eval_pairs=64)
    summary = dpo(d.out / "sft", d.out / "dpo", config, d.train_config("dpo", lr=c.dpo_lr, warmup_steps=10, min_lr_ratio=0.0,
                                                                     weight_decay=0.0),
                  resume=True, progress=c.progress, log=lambda msg: None)
    return _summary(summary)


def _run_grpo(d: _Demo) -> dict:
    """GRPO on calculator use: the world's tool_use multiplications (not the evaluation's), each
    completion through the tool loop, rewarded for the right final product and, denser, for a call
    that returned it and a reply that reports the tool's result (GRPO_REWARDS)."""
    from lmforge.train.grpo import GRPOConfig, grpo

    c = d.config
    prompts = _grpo_prompts(d)
    start = "dpo" if (d.out / "dpo" / "model.safetensors").is_file() else "sft"
    config = GRPOConfig(data=str(prompts), tools=("calculator",), rewards=GRPO_REWARDS, reward_weights=GRPO_REWARD_WEIGHTS,
                        temperature=0.7, eval_items=0)
    summary = grpo(d.out / start, d.out / "grpo", config, d.train_config("grpo", lr=c.grpo_lr, warmup_steps=0, min_lr_ratio=0.1,
                                                                        weight_decay=0.0),
                   resume=True, progress=c.progress, log=lambda msg: None)
    return {**_summary(summary), "start": start, "prompts": str(prompts), "rewards": list(GRPO_REWARDS),
            "reward_weights": list(GRPO_REWARD_WEIGHTS)}


def _grpo_prompts(d: _Demo) -> Path:
    """data/grpo_prompts.jsonl: the world's calculator questions that are not in its eval set."""
    import json

    from lmforge.data.world import World
    from lmforge.io import atomic_write_text, read_jsonl

    path = d.out / "data" / "grpo_prompts.jsonl"
    held = {str(r["prompt"]) for _, r in read_jsonl(d.world_dir / "eval" / "tool_use.jsonl")}
    items = [it for it in World(seed=d.config.seed).tasks(1000)["tool_use"]
             if (it.meta.get("expected_call") or {}).get("name") == "calculator" and str(it.prompt) not in held]
    atomic_write_text(path, "".join(json.dumps({"prompt": it.prompt, "answer": it.answer}) + "\n" for it in items))
    return path


def _summary(summary: dict) -> dict:
    keep = ("step", "tokens", "loss", "elapsed", "stop_reason", "heldout_start", "heldout_end", "eot_rate", "heldout_loss")
    return {k: summary[k] for k in keep if k in summary}


def _run_rag(d: _Demo) -> dict:
    from lmforge.prompting import rag

    db = d.out / "rag.sqlite"
    db.unlink(missing_ok=True)  # a half-written index from an interrupted run is rebuilt (a few seconds)
    stats = rag.index(db, [d.world_dir / "rag" / "documents.jsonl"], progress=False)
    return {"db": str(db), "documents": stats.documents, "chunks": stats.chunks}


def _engine(run_dir: Path) -> Engine:
    model, tokenizer = load_run(run_dir)
    return Engine(model.eval(), tokenizer, max_batch_size=32)


def _run_eval(d: _Demo) -> dict:
    """Every capability row of the report card, each model measured once."""
    from lmforge.eval import capabilities as cap
    from lmforge.eval.tasks import evaluate_tasks, load_tasks

    n = d.config.eval_items
    items = {k: v[:n] for k, v in load_tasks(d.world_dir).items()}
    models = _trained_models(d)
    result: dict = {"models": models, "chat": {}}
    for name in models:
        d.log(f"  scoring {name}")
        engine = _engine(d.out / name)
        t = time.time()
        result["chat"][name] = cap.chat_skills(engine, items["system_prompt"])
        result["chat"][name]["seconds"] = round(time.time() - t, 1)
        if name == "base":
            scores = evaluate_tasks(engine.model, engine.tokenizer, {k: items[k] for k in BASE_TASKS if k in items})
            result["base_tasks"] = {k: r.to_dict() for k, r in scores.items()}
            # str keys: the same whether fresh or read back from stages/eval.json
            result["few_shot"] = {task: {str(k): cap.few_shot(engine, items[task], k) for k in (0, 4)}
                                  for task in ("translation_4shot", "fewshot")}
    final = models[-1]  # its engine is the loop's last one
    result["final"] = final
    chat = final != "base"
    if (d.out / "rag.sqlite").is_file():
        d.log(f"  closed book vs RAG ({final})")
        result["rag"] = cap.closed_book_vs_rag(engine, items, d.out / "rag.sqlite", chat=chat, extract=True)
    if chat:
        d.log(f"  no tools vs the calculator ({final})")
        result["tools"] = cap.tools_vs_none(engine, items["tool_use"][:max(n // 2, 1)])
        if final == "grpo":  # what GRPO bought: the calculator row of the model it started from
            start = read_json(d.out / "stages" / "grpo.json")["start"] if (d.out / "stages" / "grpo.json").is_file() else "dpo"
            d.log(f"  the calculator before GRPO ({start})")
            result["tools_before_grpo"] = {"model": start, **cap.tools_vs_none(_engine(d.out / start),
                                                                              items["tool_use"][:max(n // 2, 1)])}
    t = time.time()
    out = engine.generate(SAMPLE_PROMPTS[0], _greedy(64))
    result["decode_tokens_per_s"] = round(len(out.token_ids) / max(time.time() - t, 1e-9), 1)
    return result


def _greedy(n: int):
    from lmforge.infer.sampling import SamplingParams

    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)


def _run_report(d: _Demo, results: dict) -> dict:
    from lmforge.pipeline.report import write_report

    path = write_report(d.out, d.config, results, SHARES)
    return {"report": str(path)}


def _trained_models(d: _Demo) -> list[str]:
    return [m for m in ("base", "sft", "dpo", "grpo") if (d.out / m / "model.safetensors").is_file()]


def _stale(d: _Demo, stage: str, result: dict) -> bool:
    """An evaluation of other models than those now trained (a later demo added GRPO) is run again."""
    return stage == "eval" and stage in d.config.stages and result.get("models") != _trained_models(d)


RUNNERS = {"data": _run_data, "pretrain": _run_pretrain, "sft": _run_sft, "dpo": _run_dpo, "grpo": _run_grpo, "rag": _run_rag,
           "eval": _run_eval}


def demo(out, config: DemoConfig | None = None, log=None) -> dict:
    """Run the chosen stages into `out`; returns {stage: result} (each also out/stages/<stage>.json).

    A stage whose stages/<stage>.json exists is skipped (its result is read back), except `report`,
    which is rewritten from whatever results exist."""
    c = config or DemoConfig()
    d = _Demo(Path(out), c, log or (lambda msg: None))
    (d.out / "stages").mkdir(parents=True, exist_ok=True)
    results: dict = {}
    for i, stage in enumerate(STAGES, 1):
        path = d.out / "stages" / f"{stage}.json"
        if stage == "report":
            if stage in c.stages:
                d.log(f"[{i}/{len(STAGES)}] report -> {d.out / 'report.md'}")
                results[stage] = _run_report(d, results)
            continue
        if path.is_file() and not _stale(d, stage, read_json(path)):
            results[stage] = read_json(path)
            if stage in c.stages:
                d.log(f"[{i}/{len(STAGES)}] {stage}: done in an earlier run ({results[stage]['seconds']:.0f} s), kept")
            continue
        if stage not in c.stages:
            continue
        budget = f", {d.seconds(stage) / 60:.2g} min" if stage in SHARES else ""
        d.log(f"[{i}/{len(STAGES)}] {stage}{budget}")
        t = time.time()
        result = RUNNERS[stage](d)
        result["seconds"] = round(time.time() - t, 1)
        atomic_write_json(path, result)
        results[stage] = result
    atomic_write_json(d.out / "demo.json", {"config": asdict(c), **results})
    return results
