"""Tiny artefacts the eval tests share: a random-weight HF Llama checkpoint directory written by
transformers itself (config.json, model.safetensors) with an lmforge-trained tokenizer.json and
tokenizer_config.json, so lmforge, transformers and lm-eval's HFLM all load the same model."""

import torch

from lmforge.data.chat_template import write_tokenizer_config
from lmforge.tokenizer import SPECIAL_TOKENS, train as train_tokenizer

TRAIN_TEXT = ("The quick brown fox jumps over the lazy dog. Q: What is 12 + 30? A: 42\n"
              "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
              "How many clips did Natalia sell altogether in April and May? #### 72\n") * 4


def tiny_hf_llama(d, text: str = TRAIN_TEXT, vocab_size: int = 360, block_size: int = 64, seed: int = 0):
    """A transformers LlamaForCausalLM (2 layers, 32 wide, GQA) with weights scaled up from the
    default init so its distribution is far from uniform, saved to `d` with a tokenizer."""
    import transformers

    tok = train_tokenizer(text, vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, workers=1)
    config = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=block_size,
                                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    model.save_pretrained(d)
    tok.save(d)
    write_tokenizer_config(tok, d, block_size)
    return model.eval(), tok


def wikitext_prefix(data_file, n_chars: int = 6000) -> str:
    """The first n_chars of the shared WikiText-2 validation file (skips the test when absent)."""
    return data_file("wikitext2/wiki.valid.tokens").read_text(encoding="utf-8")[:n_chars]


def hf_window_logprob(hf_model, windows) -> float:
    """Summed log-probability of each window's continuation, computed with transformers alone."""
    total = 0.0
    with torch.no_grad():
        for context, continuation in windows:
            x = torch.tensor([(context + continuation)[:-1]])
            logp = torch.log_softmax(hf_model(x).logits[0, -len(continuation):].double(), dim=-1)
            total += logp.gather(1, torch.tensor(continuation)[:, None]).sum().item()
    return total


def add_bos_post_processor(d, bos: str = "<|bos|>") -> None:
    """Give d/tokenizer.json a Llama-3-style post-processor (a Sequence holding ByteLevel and a
    TemplateProcessing) that puts `bos` before every encoding, as transformers applies it."""
    import json

    path = d / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    bos_id = next(t["id"] for t in data["added_tokens"] if t["content"] == bos)
    template = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}
    data["post_processor"] = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}, template]}
    path.write_text(json.dumps(data), encoding="utf-8")
