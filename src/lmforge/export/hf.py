"""`lmforge export hf`: a run as the whole directory a Hugging Face user (and vLLM) expects.

    config.json, model.safetensors     lmforge.model.hf.save_hf_checkpoint (the family's HF layout)
    generation_config.json             bos / eos (with the chat's end-of-turn token) / pad ids
    tokenizer.json                     the run's, as lmforge wrote it (byte-level BPE, ignore_merges)
    tokenizer_config.json              chat template and special tokens (lmforge's CHAT_TEMPLATE via
    special_tokens_map.json            write_tokenizer_config, or an HF base's own files, copied)

so `AutoModelForCausalLM.from_pretrained(dir)`, `AutoTokenizer.from_pretrained(dir)` and
`pipeline("text-generation", model=dir)` work on it, and `apply_chat_template` gives lmforge's
render_chat ids. The directory is written as a whole, atomically. Quantized runs are exported
de-quantized, LoRA runs merged (lmforge.export.source). Usage: docs/export.md.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from lmforge.data.chat_template import write_tokenizer_config
from lmforge.export.source import QWEN2_PATTERN, ExportSource, base_pattern, load_export_source, readable_by_all
from lmforge.io import atomic_dir, atomic_write_json, read_json
from lmforge.model.hf import hf_model_type, save_hf_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def check_out_path(run_dir: Path, out: Path) -> None:
    """Refuse an output that would replace the run (or a directory holding it) or an unrelated
    non-empty directory: the export replaces `out` as a whole."""
    run, target = run_dir.resolve(), out.resolve()
    if target == run or target in run.parents:
        raise ValueError(f"--out {out} is (or contains) the run directory {run_dir}; choose a new directory")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is a file; the export is a directory: choose a new path")
    if out.is_dir() and any(out.iterdir()):
        config = out / "config.json"
        if not (config.is_file() and "model_type" in read_json(config)):
            raise ValueError(f"--out {out} exists and is not an earlier Hugging Face export (no config.json with "
                             f"model_type); it would be replaced as a whole: choose a new or empty directory")


def _special_ids(source: ExportSource, tok_config: dict) -> dict:
    """bos / eos / pad ids for generation_config.json. eos lists the end of text and, when the
    tokenizer has one, the chat's end-of-turn token (`<|end|>`, or an HF template's eos such as
    `<|im_end|>`), so `generate` and `pipeline` stop where lmforge's chat stops."""
    tok = source.tokenizer

    def token_id(key):
        value = tok_config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        return tok.special_tokens.get(value) if value else None

    eos = [i for i in (token_id("eos_token"), tok.eos_id, tok.special_tokens.get("<|end|>")) if i is not None]
    ids = {"bos_token_id": token_id("bos_token") if token_id("bos_token") is not None else tok.bos_id,
           "eos_token_id": list(dict.fromkeys(eos)),
           "pad_token_id": token_id("pad_token") if token_id("pad_token") is not None else tok.pad_id}
    if len(ids["eos_token_id"]) == 1:
        ids["eos_token_id"] = ids["eos_token_id"][0]
    return {k: v for k, v in ids.items() if v not in (None, [])}


def write_tokenizer_files(source: ExportSource, out: Path) -> dict:
    """tokenizer.json, tokenizer_config.json (+ special_tokens_map.json) in `out`; returns the
    tokenizer config written. A run with its own tokenizer_config.json (SFT runs, HF bases) keeps
    it; a pretraining run gets lmforge's chat template (the one render_chat implements)."""
    src = source.tokenizer_dir
    shutil.copyfile(src / "tokenizer.json", out / "tokenizer.json")
    if (src / "tokenizer_config.json").is_file():
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, out / name)
    else:
        write_tokenizer_config(source.tokenizer, out, source.model.config.block_size)
    return read_json(out / "tokenizer_config.json")


def export_hf(run_dir: str | Path, out: str | Path, dtype: str | None = None) -> dict:
    """Write the Hugging Face directory of the run in `run_dir` to `out` (replaced as a whole).
    dtype: "float32" | "bfloat16" | "float16" (None keeps the run's). Returns a report."""
    run_dir, out = Path(run_dir), Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    check_out_path(run_dir, out)
    source = load_export_source(run_dir)
    model = source.model.to(DTYPES[dtype]) if dtype else source.model
    model_type = hf_model_type(model.config)  # ValueError naming what has no HF counterpart
    if model_type == "qwen2" and base_pattern(source.tokenizer.pattern) != QWEN2_PATTERN:
        source.notes.append("model_type qwen2 with a split pattern other than Qwen2's: transformers >= 5 loads it with "
                            "Qwen2Tokenizer, which re-splits with Qwen2's pattern; for lmforge's ids load the tokenizer "
                            "with PreTrainedTokenizerFast.from_pretrained(dir) (docs/export.md)")
    with atomic_dir(out) as tmp:
        save_hf_checkpoint(model, tmp)
        tok_config = write_tokenizer_files(source, tmp)
        generation = _special_ids(source, tok_config)
        if (source.tokenizer_dir / "generation_config.json").is_file():  # an HF base's own
            generation = {**generation, **read_json(source.tokenizer_dir / "generation_config.json")}
        atomic_write_json(tmp / "generation_config.json", generation)
        # config.json carries the ids too (GPT2Config would otherwise default them to GPT-2's 50256)
        config = read_json(tmp / "config.json")
        eos = generation.get("eos_token_id")
        config.update({k: v for k, v in (("bos_token_id", generation.get("bos_token_id")),
                                         ("eos_token_id", eos[0] if isinstance(eos, list) else eos),
                                         ("pad_token_id", generation.get("pad_token_id"))) if v is not None})
        atomic_write_json(tmp / "config.json", config)
    readable_by_all(out)
    return {"out": str(out), "model_type": model_type, "architecture": read_json(out / "config.json")["architectures"][0],
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "files": sorted(p.name for p in out.iterdir()), "notes": source.notes}

