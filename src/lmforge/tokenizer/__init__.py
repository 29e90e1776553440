"""lmforge.tokenizer: byte-level BPE (GPT-2 / GPT-4 / Llama 3 style).

    from lmforge.tokenizer import Tokenizer, train, SPECIAL_TOKENS
    tok = train([Path("corpus.txt")], vocab_size=8192, pattern="gpt4")
    tok.save("runs/x")                      # runs/x/tokenizer.json (HF format)
    tok = Tokenizer.load("runs/x")
"""

from .patterns import PATTERNS
from .tokenizer import SPECIAL_TOKENS, StreamDecoder, Tokenizer
from .training import train

__all__ = ["PATTERNS", "SPECIAL_TOKENS", "StreamDecoder", "Tokenizer", "train"]
