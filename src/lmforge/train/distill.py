"""Knowledge distillation: a student learns the teacher's next-token distribution, not only the
data's one-hot targets (Hinton et al. 2015).

    loss = alpha * CE(student, data) + (1 - alpha) * T^2 * KL(teacher_T || student_T)

where `_T` is the softmax of logits / T. The T^2 keeps the KL's gradient on the same scale as the
CE's whatever the temperature (Hinton et al. 2015, section 2: the soft targets' gradients scale as
1/T^2). `kl="reverse"` uses KL(student_T || teacher_T) instead: mode-seeking, the student puts
its mass where the teacher is confident rather than covering all of the teacher's tails (MiniLLM,
Gu et al. 2024). With `top_k` > 0 only the teacher's k most likely tokens per position are kept and
renormalised (large vocabularies: the rest of the teacher's mass is dropped); the forward KL then
compares them with the student's full-vocabulary log-probabilities (still >= 0, zero only when the
student matches the truncated teacher exactly), the reverse KL renormalises the student over the
same k tokens.

The teacher's logits are computed on the fly in the objective, under no_grad: nothing is cached on
disk, and each student step costs one extra teacher forward (see `teacher_cost`).

On-policy distillation (GKD, Agarwal et al. 2024): with probability `on_policy` (their lambda) a
batch is the student's own continuation of the first `prompt_tokens` tokens of each data window,
sampled through lmforge.infer.engine.Engine; the teacher scores every generated position and the
loss is the KL alone on those positions (there are no data targets there). This trains the student
on the states it visits itself, not only on the data's (the train/inference mismatch of
off-policy distillation). Simplifications: GKD's generalised Jensen-Shannon divergence is replaced
by the forward or reverse KL; sampling is at temperature `sample_temperature`.

`distill()` is the stage (`lmforge distill`): a teacher run, a student preset (initialised as
pretraining initialises it: same seed, same weights) or run, the data's token shards, and the one
training loop (loop.py). Teacher and student must share one tokenizer (compared by its hash).
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.data.chat_template import write_tokenizer_config
from lmforge.data.loader import TokenLoader
from lmforge.data.shards import ShardDataset
from lmforge.infer import load_run
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.io import atomic_write_json
from lmforge.model import ModelConfig, Transformer
from lmforge.model.params import flops_per_token
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import find_checkpoint
from lmforge.train.loop import TrainConfig, train
from lmforge.train.pretrain import make_evaluate

IGNORE = -100


@dataclass
class DistillConfig:
    data: str | None = field(default=None, metadata={"help": "token shards directory (none: the teacher run's data/shards)"})
    temperature: float = field(default=2.0, metadata={"help": "softening temperature T of both distributions (the KL is scaled by T^2)"})
    alpha: float = field(default=0.5, metadata={"help": "weight of the cross-entropy on the data; 1 - alpha on the KL to the teacher"})
    kl: str = field(default="forward", metadata={"help": "forward: KL(teacher || student); reverse: KL(student || teacher)",
                                                 "choices": ["forward", "reverse"]})
    top_k: int = field(default=0, metadata={"help": "keep the teacher's k most likely tokens per position (0: the whole vocabulary)"})
    on_policy: float = field(default=0.0, metadata={"help": "share of batches the student samples itself (GKD lambda; 0: off-policy)"})
    prompt_tokens: int = field(default=32, metadata={"help": "on-policy: data tokens each sample continues"})
    gen_tokens: int = field(default=64, metadata={"help": "on-policy: tokens the student samples per row"})
    sample_temperature: float = field(default=1.0, metadata={"help": "on-policy: the student's sampling temperature"})
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch"})
    seq_len: int = field(default=128, metadata={"help": "tokens per sequence"})
    eval_windows: int = field(default=128, metadata={"help": "validation windows (the val split's first)"})

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha} must be in [0, 1]")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        if self.kl not in ("forward", "reverse"):
            raise ValueError(f"kl={self.kl!r}, expected 'forward' or 'reverse'")
        if self.top_k < 0 or not 0.0 <= self.on_policy <= 1.0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 and on_policy={self.on_policy} in [0, 1]")


# defaults of the loop's settings for distillation (the CLI's flags override them)
DISTILL_TRAIN_DEFAULTS = {"max_steps": 1000, "lr": 3e-3, "warmup_steps": 20, "optimizer": "muon", "eval_interval": 0,
                          "ckpt_interval": 200}


# ---- the loss ----

def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kl: str = "forward", top_k: int = 0) -> torch.Tensor:
    """(M, V) student and teacher logits -> (M,) KL per position, in nats.

    forward: sum_v p_t(v) (log p_t(v) - log p_s(v)); reverse: sum_v p_s(v) (log p_s(v) - log p_t(v)).
    top_k: the teacher's k largest logits, renormalised (see the module docstring).
    """
    s_logp = F.log_softmax(student_logits.float(), dim=-1)  # (M, V)
    teacher_logits = teacher_logits.float()
    if top_k:
        t_top, idx = teacher_logits.topk(min(top_k, teacher_logits.shape[-1]), dim=-1)  # (M, k)
        t_logp = F.log_softmax(t_top, dim=-1)
        s_logp = s_logp.gather(-1, idx) if kl == "forward" else F.log_softmax(student_logits.float().gather(-1, idx), dim=-1)
    else:
        t_logp = F.log_softmax(teacher_logits, dim=-1)
    if kl == "forward":
        return (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    return (s_logp.exp() * (s_logp - t_logp)).sum(-1)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                 alpha: float = 0.5, kl: str = "forward", top_k: int = 0) -> tuple[torch.Tensor, dict]:
    """(B, T, V) logits, (B, T) targets (-100: not scored) ->
    (alpha * CE + (1 - alpha) * T^2 * mean KL over the scored positions, {"kd_loss", "ce_loss"})."""
    mask = targets != IGNORE  # (B, T)
    s, t = student_logits[mask], teacher_logits[mask]  # (M, V)
    kd = token_kl(s / temperature, t / temperature, kl, top_k).mean() * temperature**2
    ce = F.cross_entropy(s.float(), targets[mask]) if alpha > 0 else torch.zeros((), device=s.device)
    loss = alpha * ce + (1.0 - alpha) * kd
    return loss, {"kd_loss": kd.detach(), "ce_loss": ce.detach()}


def make_distill_objective(teacher: torch.nn.Module, config: DistillConfig, vocab_size: int):
    """objective(student, batch) -> (loss, metrics): the teacher's logits on the same tokens under
    no_grad, both cut to the tokenizer's `vocab_size` (the models may pad their vocabularies
    differently); on-policy batches take the KL alone."""
    teacher.eval().requires_grad_(False)

    def objective(model, batch: dict) -> tuple[torch.Tensor, dict]:
        idx, targets = batch["idx"], batch["targets"]  # (B, T), (B, T)
        logits, _ = model(idx)
        with torch.no_grad():
            teacher_logits, _ = teacher(idx)
        alpha = 0.0 if batch["on_policy"] else config.alpha
        loss, metrics = distill_loss(logits[..., :vocab_size], teacher_logits[..., :vocab_size], targets,
                                     config.temperature, alpha, config.kl, config.top_k)
        return loss, {"n_tokens": int((targets != IGNORE).sum()), "on_policy": float(batch["on_policy"]), **metrics}

    return objective


# ---- the batches ----

class DistillBatches:
    """Batches {"idx", "targets", "on_policy"} from a TokenLoader: the data's windows, or with
    probability `on_policy` the student's own continuations (GKD). Which batches are sampled and
    the samples' seeds follow from (seed, batch number), so a resumed run draws the same ones."""

    def __init__(self, loader: TokenLoader, student: torch.nn.Module, tokenizer: Tokenizer, config: DistillConfig,
                 seed: int = 0, device="cpu"):
        self.loader, self.student, self.tokenizer, self.config = loader, student, tokenizer, config
        self.seed, self.device, self.n = seed, device, 0
        if config.on_policy and config.prompt_tokens + config.gen_tokens > config.seq_len + 1:
            raise ValueError(f"prompt_tokens + gen_tokens = {config.prompt_tokens + config.gen_tokens} exceeds seq_len + 1 = {config.seq_len + 1}")

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        window = next(self.loader)  # (B, T+1)
        n, self.n = self.n, self.n + 1
        if self.config.on_policy and random.Random(f"{self.seed}:{n}").random() < self.config.on_policy:
            return self._sample(window, n)
        return {"idx": window[:, :-1].to(self.device), "targets": window[:, 1:].to(self.device), "on_policy": False}

    def _sample(self, window: torch.Tensor, n: int) -> dict:
        """The student continues each row's first prompt_tokens tokens; only the generated tokens are targets."""
        c = self.config
        prompts = window[:, :c.prompt_tokens].tolist()
        params = [SamplingParams(max_new_tokens=c.gen_tokens, temperature=c.sample_temperature, ignore_eos=True,
                                 seed=(self.seed * 1_000_003 + n) * 1024 + i) for i in range(len(prompts))]
        with torch.no_grad():
            out = Engine(self.student, self.tokenizer, max_batch_size=len(prompts)).generate(prompts, params)
        length = c.prompt_tokens + c.gen_tokens
        rows, targets = [], []
        for prompt, completion in zip(prompts, out):
            ids = (prompt + completion.token_ids)[:length]
            n_pad = length - len(ids)
            row = ids + [0] * n_pad
            target = [IGNORE] * (c.prompt_tokens - 1) + ids[c.prompt_tokens:] + [IGNORE] * n_pad
            rows.append(row[:-1])
            targets.append(target)
        return {"idx": torch.tensor(rows, device=self.device), "targets": torch.tensor(targets, device=self.device), "on_policy": True}

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict(), "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])
        self.n = int(state["n"])


# ---- the stage ----

def check_same_tokenizer(teacher: Tokenizer, student: Tokenizer, teacher_where: str, student_where: str) -> None:
    """One clear error when the two tokenizers differ: the KL compares distributions token id by token id."""
    if teacher.hash != student.hash:
        raise ValueError(f"teacher and student tokenizers differ: {teacher_where} has hash {teacher.hash} "
                         f"(vocab {teacher.vocab_size}), {student_where} has hash {student.hash} (vocab {student.vocab_size}); "
                         f"distillation compares next-token distributions id by id, so both must use one tokenizer")


def teacher_cost(teacher_config: ModelConfig, student_config: ModelConfig, seq_len: int) -> dict:
    """FLOPs per token of the student's training step (6N + attention) and of the teacher's forward
    (2N + attention), and their ratio: the extra compute distillation spends per token."""
    student = flops_per_token(student_config, seq_len, training=True)
    teacher = flops_per_token(teacher_config, seq_len, training=False)
    return {"student_train_flops_per_token": student, "teacher_forward_flops_per_token": teacher,
            "teacher_extra_cost": teacher / student}


def load_student(student: str, tokenizer: Tokenizer, seed: int, device) -> tuple[torch.nn.Module, Tokenizer, str]:
    """A run directory (its weights and tokenizer) or a preset name initialised as pretrain() does
    (torch.manual_seed(seed), init_weights(seed)), so a distilled and a from-scratch student start equal."""
    if Path(student).is_dir():
        model, student_tok = load_run(student, device=device)
        return model.float().train(), student_tok, str(Path(student) / "tokenizer.json")
    cfg = ModelConfig.from_preset(student, vocab_size=tokenizer.vocab_size)  # an unknown preset names the known ones
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights(seed=seed)
    return model.to(device), tokenizer, f"preset {student!r} (the data's tokenizer)"


def distill(teacher_dir: str | Path, student: str, out: str | Path, config: DistillConfig | None = None,
            train_config: TrainConfig | None = None, resume: bool = False, progress: bool = True, log=None) -> dict:
    """Distil the teacher run into the student (a preset or a run directory); write the run
    directory `out` (model.safetensors, tokenizer, metrics, summary.json with the teacher's cost)."""
    config = config or DistillConfig()
    train_config = train_config or TrainConfig(**DISTILL_TRAIN_DEFAULTS)
    log = log or (lambda msg: None)
    out, teacher_dir = Path(out), Path(teacher_dir)
    if not resume and find_checkpoint(out) is not None:
        raise ValueError(f"{out} already holds a run (train_state/); pass --resume to continue it or choose another --out")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher, teacher_tok = load_run(teacher_dir, device=device)
    teacher = teacher.float()
    shards = Path(config.data) if config.data else teacher_dir / "data" / "shards"
    if not shards.is_dir():
        raise FileNotFoundError(2, "no token shards (pass --data SHARDS, from `lmforge data prepare`)", str(shards))
    train_ds = ShardDataset(shards, "train")
    data_tok = Tokenizer.load(shards)
    check_same_tokenizer(teacher_tok, data_tok, str(teacher_dir / "tokenizer.json"), str(shards))
    model, student_tok, student_where = load_student(student, data_tok, train_config.seed, device)
    check_same_tokenizer(teacher_tok, student_tok, str(teacher_dir / "tokenizer.json"), student_where)
    for name, m in (("teacher", teacher), ("student", model)):
        if config.seq_len > m.config.block_size:
            raise ValueError(f"seq_len={config.seq_len} exceeds the {name}'s block_size={m.config.block_size}")
    loader = TokenLoader(train_ds, config.batch_size, config.seq_len, seed=train_config.seed)
    data = DistillBatches(loader, model, student_tok, config, seed=train_config.seed, device=device)
    cost = teacher_cost(teacher.config, model.config, config.seq_len)
    resolved = {"teacher": str(teacher_dir), "student": student, "distill": asdict(config), "train": asdict(train_config),
                "data": str(shards.resolve()), "teacher_params": teacher.num_params(), "student_params": model.num_params(),
                "student_model": model.config.to_dict(), **cost}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "distill_config.json", resolved)
    student_tok.save(out)
    write_tokenizer_config(student_tok, out, model.config.block_size)
    log(resolved)
    val_ds = ShardDataset(shards, "val") if "val" in train_ds.meta["splits"] else None
    evaluate = make_evaluate(val_ds, config.batch_size, config.seq_len, config.eval_windows, 0, 1, device) if val_ds else None
    objective = make_distill_objective(teacher, config, data_tok.vocab_size)
    train_config.progress = train_config.progress and progress
    t0 = time.time()
    summary = train(model, objective, data, train_config, out, evaluate=evaluate, resume=resume,
                    flops_per_token=cost["student_train_flops_per_token"])
    summary.update(wall_time=time.time() - t0, **cost)
    atomic_write_json(out / "summary.json", summary)
    return summary
