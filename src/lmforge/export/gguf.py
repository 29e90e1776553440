"""`lmforge export gguf`: a Llama-layout run as one GGUF file llama.cpp loads (with the `gguf` package).

Covered: lmforge's own layout and HF Llama / Mistral (GGUF arch `llama`), Qwen2 (arch `qwen2`, q/k/v
biases) and Mixtral (arch `llama` with `expert_count`, experts stacked as llama.cpp reads them).
Anything else (GPT-2's learned positions, QK-norm, shared experts, MLA, ...) is refused by name.

What llama.cpp needs, and why each piece is as it is:
- Q/K rows permuted for arch `llama`: lmforge (like HF) rotates the two halves of each head
  (rotate_half), llama.cpp's `llama` RoPE rotates adjacent pairs (2i, 2i+1). The permutation of
  llama.cpp's convert_hf_to_gguf.py (`LlamaModel.permute`) reorders each head's rows so pair i
  of the interleaved layout is rows (i, i + D/2) of ours. `qwen2` uses NEOX RoPE (halves): no
  permutation. Llama-3 frequency scaling becomes the `rope_freqs` tensor (llama.cpp divides the
  plain frequencies by it), computed from lmforge's own rope_inv_freq.
- The tokenizer as `gpt2` BPE: tokens in GPT-2's byte-to-unicode alphabet, merges "a b" from
  lmforge's ranks (merges_from_ranks, as tokenizer.json has them), special tokens typed CONTROL,
  padding ids (a vocabulary rounded up) as UNUSED `[PAD{i}]`, and a pre-tokenizer name whose
  llama.cpp split regex is the run's pattern (PRE_TOKENIZERS); no BOS added (lmforge adds none).
- The chat template without `{% generation %}` tags (they only mark the assistant mask for
  transformers; llama.cpp's Jinja does not know them and they render to nothing).
- dtypes as llama.cpp's converter chooses them: 1-D tensors (norms, biases), the MoE router and
  `rope_freqs` stay F32; --dtype applies to the matrices; Q8_0 (blocks of 32 with one f16 scale,
  gguf.quants) falls back to F16 for a row length not divisible by 32.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from lmforge.data.chat_template import CHAT_TEMPLATE
from lmforge.export.source import QWEN2_PATTERN, ExportSource, base_pattern, load_export_source, readable_by_all
from lmforge.io import atomic_path, read_json
from lmforge.model.config import ModelConfig
from lmforge.model.hf import hf_model_type
from lmforge.model.pretrained import model_state_dict
from lmforge.model.transformer import rope_inv_freq
from lmforge.tokenizer.bpe import merges_from_ranks
from lmforge.tokenizer.formats import bytes_to_unicode
from lmforge.tokenizer.patterns import PATTERNS

SUPPORTED = ("lmforge's own Llama layout", "Llama", "Mistral", "Qwen2", "Mixtral")
UNCOVERED = {"deepseek_v3": "DeepSeek-V3 (Multi-head Latent Attention (MLA), shared experts, sigmoid routing)",
             "gemma3_text": "Gemma 3 (GeGLU, (1 + w) norms, QK-norm, interleaved local/global sliding-window layers)"}
DTYPES = ("f32", "f16", "q8_0")

# split pattern -> the `tokenizer.ggml.pre` name llama.cpp (src/llama-vocab.cpp) maps to the same
# regex: "gpt-2" -> LLAMA_VOCAB_PRE_TYPE_GPT2, "llama-bpe" -> LLAMA3 (cl100k's regex), "gpt-4o" ->
# GPT4O (o200k's), "qwen2" -> QWEN2
PRE_TOKENIZERS = {PATTERNS["gpt2"]: "gpt-2", PATTERNS["gpt4"]: "llama-bpe", PATTERNS["o200k"]: "gpt-4o", QWEN2_PATTERN: "qwen2"}
# lmforge's own name of each pattern, for the error message
PATTERN_NAMES = {PATTERNS["gpt2"]: "gpt2", PATTERNS["gpt4"]: "gpt4/cl100k/llama3", PATTERNS["o200k"]: "o200k",
                 QWEN2_PATTERN: "qwen2", PATTERNS["digits"]: "digits"}

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5  # gguf.TokenType
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}  # gguf.LlamaFileType: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0

# lmforge tensor name inside `layers.{i}.` -> GGUF name inside `blk.{i}.` (llama.cpp's LLM_TENSOR names)
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
    # Mixtral: router (E, C) and stacked experts, numpy shapes (E, F, C) / (E, C, F) = GGUF ne {C, F, E} / {F, C, E}
    "mlp.router.weight": "ffn_gate_inp.weight",
    "mlp.w_gate": "ffn_gate_exps.weight", "mlp.w_up": "ffn_up_exps.weight", "mlp.w_down": "ffn_down_exps.weight",
}
GLOBAL_TENSORS = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
SKIPPED = ("mlp.router_bias",)  # the sigmoid router's balancing bias: unused by a softmax_topk (Mixtral) router


# --------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------
def gguf_arch(config: ModelConfig) -> str:
    """The GGUF architecture of an lmforge config ("llama" or "qwen2"); ValueError naming what the
    exporter does not cover and listing what it does."""
    supported = f"supported: {', '.join(SUPPORTED)}"
    try:
        model_type = hf_model_type(config)
    except ValueError as e:
        raise ValueError(f"GGUF export does not cover this architecture ({e}); {supported}") from None
    if model_type == "gpt2":
        raise ValueError(f"GGUF export does not cover GPT-2 (learned position embeddings, LayerNorm, GELU); {supported}")
    if model_type not in ("llama", "mistral", "qwen2", "mixtral"):
        described = UNCOVERED.get(model_type, model_type)
        raise ValueError(f"GGUF export does not cover {described} (HF model_type {model_type!r}); {supported}")
    if config.bias:
        raise ValueError(f"GGUF export does not cover Llama with bias=True (biases on every Linear); {supported}")
    return "qwen2" if model_type == "qwen2" else "llama"


def context_length(config: ModelConfig) -> int:
    """llama.context_length: the block size, or a (Mistral) sliding window when shorter. llama.cpp's
    `llama` architecture attends to the whole context; within the window that equals the sliding
    window exactly, so the file declares the window as its trained context."""
    window = config.sliding_window
    return config.block_size if window is None else min(config.block_size, window)


def permute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection (n_head * D, ...) from rotate-half to llama.cpp's interleaved RoPE
    layout (convert_hf_to_gguf.py's LlamaModel.permute): within each head, output row 2i is our
    row i and row 2i+1 our row i + D/2.  Head of D=4 rows [r0, r1, r2, r3] -> [r0, r2, r1, r3]."""
    rest = w.shape[1:]
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def unpermute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of permute_rotary (llama.cpp's layout back to rotate-half)."""
    rest = w.shape[1:]
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model, arch: str) -> dict[str, torch.Tensor]:
    """GGUF name -> float32 tensor in llama.cpp's layout (numpy order: GGUF's ne reversed)."""
    config = model.config
    out = {}
    for name, t in model_state_dict(model).items():
        t = t.float()
        if name in GLOBAL_TENSORS:
            out[GLOBAL_TENSORS[name]] = t
            continue
        layer, _, leaf = name.partition(".")[2].partition(".")
        if leaf in SKIPPED:
            continue
        if not name.startswith("layers.") or leaf not in LAYER_TENSORS:
            raise ValueError(f"tensor {name!r} has no GGUF counterpart in the exporter (architecture not covered)")
        if arch == "llama" and leaf.startswith(("self_attn.q_proj", "self_attn.k_proj")):
            t = permute_rotary(t, config.n_head if "q_proj" in leaf else config.n_kv_head)
        out[f"blk.{layer}.{LAYER_TENSORS[leaf]}"] = t
    if config.rope_scaling:  # Llama-3 scaling: llama.cpp divides the plain frequencies by rope_freqs
        plain = rope_inv_freq(config.head_dim, config.rope_theta)
        out["rope_freqs.weight"] = plain / rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    return out


def tensor_type(name: str, t: torch.Tensor, dtype: str) -> str:
    """"f32" | "f16" | "q8_0" for one tensor, as llama.cpp's converter chooses."""
    if t.ndim <= 1 or name.endswith(("_norm.weight", ".bias", "ffn_gate_inp.weight")) or name == "rope_freqs.weight":
        return "f32"
    if dtype == "q8_0" and t.shape[-1] % 32:
        return "f16"  # Q8_0 blocks are 32 values along a row
    return dtype


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------
def pre_tokenizer_name(pattern: str) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a split pattern; ValueError for one it has no match for."""
    pattern = base_pattern(pattern)
    if pattern in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[pattern]
    name = PATTERN_NAMES.get(pattern, "a custom regex")
    raise ValueError(f"the tokenizer's split pattern ({name}) has no llama.cpp pre-tokenizer with the same regex; "
                     f"GGUF export supports the patterns gpt2 (-> 'gpt-2'), gpt4/cl100k/llama3 (-> 'llama-bpe'), "
                     f"o200k (-> 'gpt-4o') and Qwen2's (-> 'qwen2')")


def tokenizer_vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) for `vocab_size` ids: byte-level tokens in GPT-2's
    byte-to-unicode alphabet (b" the" -> "Ġthe"), special tokens verbatim (CONTROL), ids no token
    has (a vocabulary rounded up for fast matmuls) as "[PAD{id}]" (UNUSED)."""
    alphabet = bytes_to_unicode()

    def to_unicode(b: bytes) -> str:
        return "".join(alphabet[x] for x in b)

    tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [TOKEN_UNUSED] * vocab_size
    for token, i in tokenizer.ranks.items():
        tokens[i], types[i] = to_unicode(token), TOKEN_NORMAL
    for token, i in tokenizer.special_tokens.items():
        tokens[i], types[i] = token, TOKEN_CONTROL
    merges = [f"{to_unicode(a)} {to_unicode(b)}" for a, b in merges_from_ranks(tokenizer.ranks)]
    return tokens, types, merges


def chat_template_of(source: ExportSource) -> str:
    """The run's chat template (its tokenizer_config.json's, else lmforge's), generation tags removed."""
    path = source.tokenizer_dir / "tokenizer_config.json"
    template = read_json(path).get("chat_template") if path.is_file() else None
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (source.tokenizer_dir / "chat_template.jinja").is_file():
        template = (source.tokenizer_dir / "chat_template.jinja").read_text(encoding="utf-8")
    return re.sub(r"{%-?\s*(end)?generation\s*-?%}", "", template or CHAT_TEMPLATE)


# --------------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------------
def _add_metadata(writer, source: ExportSource, arch: str, dtype: str) -> None:
    """general.*, {arch}.* hyperparameters and tokenizer.* keys."""
    config, tok = source.model.config, source.tokenizer
    writer.add_name(source.run_dir.resolve().name)
    writer.add_file_type(FILE_TYPES[dtype])
    if dtype == "q8_0":
        writer.add_quantization_version(2)  # GGML_QUANT_VERSION
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(context_length(config))
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.ffn_hidden)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_kv_head)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    if config.n_expert:
        writer.add_expert_count(config.n_expert)
        writer.add_expert_used_count(config.n_expert_per_token)
    tokens, types, merges = tokenizer_vocab(tok, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tok.pattern))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for add, token_id in ((writer.add_bos_token_id, tok.bos_id), (writer.add_eos_token_id, tok.eos_id),
                          (writer.add_pad_token_id, tok.pad_id), (writer.add_eot_token_id, tok.special_tokens.get("<|end|>"))):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(False)  # lmforge encodes text without a BOS (chat templates write their own)
    writer.add_add_eos_token(False)
    writer.add_chat_template(chat_template_of(source))


def _encode_tensor(t: torch.Tensor, qtype: str):
    """(numpy array, GGML type or None) as GGUFWriter.add_tensor takes them."""
    import gguf  # the `gguf` package: imported on use (an optional dependency)

    a = t.detach().cpu().contiguous().numpy().astype(np.float32)
    if qtype == "f32":
        return a, None
    if qtype == "f16":
        return a.astype(np.float16), None
    return gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def export_gguf(run_dir: str | Path, out: str | Path, dtype: str = "f16", progress: bool = False) -> dict:
    """Write the run in `run_dir` as the GGUF file `out` (atomically). dtype: f32 | f16 | q8_0.
    Returns a report (architecture, tensor count and types, file size)."""
    import gguf  # the `gguf` package: imported on use (an optional dependency)

    run_dir, out = Path(run_dir), Path(out)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give the path of the .gguf file to write")
    if out.is_file() and _magic(out) != b"GGUF":
        raise ValueError(f"--out {out} exists and is not a GGUF file; it would be replaced: choose a new path")
    source = load_export_source(run_dir)
    arch = gguf_arch(source.model.config)
    pre_tokenizer_name(source.tokenizer.pattern)  # refuse an unknown pattern before any work
    tensors = gguf_tensors(source.model, arch)
    if context_length(source.model.config) < source.model.config.block_size:
        source.notes.append(f"sliding window {source.model.config.sliding_window} < block_size "
                            f"{source.model.config.block_size}: llama.cpp's llama architecture has no sliding window, "
                            f"so context_length is the window (full attention within it is the same model)")
    counts: dict[str, int] = {}
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        _add_metadata(writer, source, arch, dtype)
        for name, t in tensors.items():
            qtype = tensor_type(name, t, dtype)
            counts[qtype] = counts.get(qtype, 0) + 1
            array, raw_dtype = _encode_tensor(t, qtype)
            writer.add_tensor(name, array, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
    readable_by_all(out)
    return {"out": str(out), "arch": arch, "dtype": dtype, "tensors": len(tensors), "tensor_types": counts,
            "pre_tokenizer": pre_tokenizer_name(source.tokenizer.pattern), "bytes": out.stat().st_size, "notes": source.notes}
