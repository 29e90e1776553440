"""Prompt builders against hand-written expectations; self-consistency through the real engine
(one prefill for n chains) with a scripted model; `rag.ask` end to end on a real index."""

import json

import pytest
import torch

from lmforge.data.chat import render_chat
from lmforge.data.world import World
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer
from lmforge.prompting import prompts as P
from lmforge.prompting import rag
from lmforge.tokenizer import train

EXAMPLES = [("What is 1 + 1?", "2"), ("Which sea does the Vlim river end in?", "the Oro Sea"),
            ("What is 7 * 6?", "42"), ("How long is the Brarken river?", "634"), ("Translate cat", "chat")]


def test_zero_few_shot_and_cot_templates():
    assert P.zero_shot(" What is 2 + 3? ") == "Q: What is 2 + 3? A:"
    assert P.few_shot("What is 2 + 3?", EXAMPLES[:1], k=1) == "Q: What is 1 + 1? A: 2\nQ: What is 2 + 3? A:"
    assert P.few_shot("What is 2 + 3?", EXAMPLES, k=0) == "Q: What is 2 + 3? A:"
    assert P.chain_of_thought("What is 2 + 3?") == "Q: What is 2 + 3? Think step by step. A:"
    # the world's own arithmetic_cot prompts are exactly this format
    item = World(0).tasks(n=5)["arithmetic_cot"][0]
    assert P.chain_of_thought(item.prompt.removeprefix("Q: ").removesuffix(" Think step by step. A:")) == item.prompt


def test_few_shot_selection():
    a = P.select_examples("q", EXAMPLES, 3, seed=1)
    assert a == P.select_examples("q", EXAMPLES, 3, seed=1) and len(set(a)) == 3
    assert {tuple(P.select_examples("q", EXAMPLES, 3, seed=s)) for s in range(10)} != {tuple(a)}  # seeds differ
    near = P.select_examples("How long is the Skiltell river?", EXAMPLES, 2, by_similarity=True)
    assert near[-1] == ("How long is the Brarken river?", "634")  # most similar last, next to the question
    assert P.select_examples("What is 9 * 3?", EXAMPLES, 1, by_similarity=True) == [("What is 7 * 6?", "42")]
    with pytest.raises(ValueError, match="6 shots asked for but only 5"):
        P.select_examples("q", EXAMPLES, 6)


def test_extract_answer_and_vote():
    assert P.extract_answer("First, 20 + 5 = 25. So 25 + 3 = 28.") == "28"
    assert P.extract_answer("so 12 apples\n#### 7") == "7"
    assert P.extract_answer(" Paris\nmore") == "Paris"
    assert P.majority_vote(["3", "4", "3", ""]) == ("3", 0.5)
    assert P.majority_vote(["4", "3", "3", "4"]) == ("4", 0.5)
    assert P.majority_vote(["", ""]) == ("", 0.0)


def test_chat_prompt_with_system_and_shots():
    tok = train("hello there assistant " * 20, vocab_size=274, workers=1)
    ids = P.chat_prompt(tok, "Hi?", system="Be terse.", shots=[("1+1?", "2")])
    expected, _ = render_chat(tok, [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "1+1?"},
                                    {"role": "assistant", "content": "2"}, {"role": "user", "content": "Hi?"}], add_generation_prompt=True)
    assert ids == expected and ids[-1] == tok.special_tokens["<|assistant|>"]


class ChoiceModel(Transformer):
    """A real tiny Transformer whose next-token logits are fixed per step after the prompt: a
    distribution over answer digits at the first generated position, then a newline. Counts
    prefill tokens, to see the n chains share one prefill."""

    def __init__(self, cfg, prompt_len, first_logits, newline_id):
        super().__init__(cfg)
        self.prompt_len, self.first_logits, self.newline_id = prompt_len, first_logits, newline_id
        self.prefill_tokens = 0

    def forward(self, idx, targets=None, kv_cache=None, positions=None, logits_to_keep=0, return_logits=True, segment_ids=None):
        B, L = idx.shape
        pos = positions if positions is not None else kv_cache.pos[:, None] + torch.arange(L)
        if L > 1:
            self.prefill_tokens += B * L
        logits, loss = super().forward(idx, targets, kv_cache, positions, logits_to_keep, return_logits, segment_ids)
        for b in range(B):
            logits[b, -1] = -1e4
            if int(pos[b, -1]) == self.prompt_len - 1:
                logits[b, -1] = self.first_logits
            else:
                logits[b, -1, self.newline_id] = 1e4
        return logits, loss


def test_self_consistency_one_prefill_majority():
    tok = train("Q: What is 3 + 4? A: 7 8 9 0 1 2 3 4 5 6\n" * 30, vocab_size=272, workers=1)
    prompt = P.chain_of_thought("What is 3 + 4?")
    ids = tok.encode(prompt)
    digit = {d: tok.encode(str(d)) for d in (7, 8)}
    assert all(len(v) == 1 for v in digit.values())
    first = torch.full((tok.vocab_size,), -1e4)
    first[digit[7][0]], first[digit[8][0]] = 1.0, 0.0  # p(7) = e / (e + 1) ~ 0.73
    cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=2, n_kv_head=2,
                                  block_size=128, norm="layernorm", activation="gelu")
    model = ChoiceModel(cfg, len(ids), first, tok.encode("\n")[0])
    model.init_weights(seed=0)
    engine = Engine(model.eval(), tok)
    vote = P.self_consistency(engine, prompt, n=16, temperature=1.0, max_new_tokens=4, seed=3)
    assert model.prefill_tokens == len(ids)  # one prefill for 16 chains
    assert len(vote.answers) == 16 and set(vote.answers) <= {"7", "8"}
    assert vote.answer == "7" and vote.confidence == vote.answers.count("7") / 16 > 0.5
    assert 0 < vote.answers.count("8")  # they really were sampled
    again = P.self_consistency(engine, prompt, n=16, temperature=1.0, max_new_tokens=4, seed=3)
    assert again.answers == vote.answers  # seeded


def test_rag_ask_end_to_end(tmp_path):
    docs = World(0).rag_documents()
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    db = tmp_path / "docs.db"
    rag.index(db, [path])
    tok = train(" ".join(d["text"] for d in docs) * 3, vocab_size=400, workers=1)
    cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=2, n_kv_head=2, block_size=96)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    engine = Engine(model.eval(), tok)
    answer = rag.ask(engine, db, "How many kilometres long is the Brarken river?", k=3, max_new_tokens=8)
    assert answer.grounded and answer.sources[0].title == "the Brarken river"
    assert answer.dropped_sources >= 1  # 96 tokens of context: sources were trimmed, not the question
    assert len(tok.encode(answer.prompt)) <= 96 - 8 and answer.prompt.endswith("Q: How many kilometres long is the Brarken river? A:")
    assert answer.citations and all(c.doc_id in {h.doc_id for h in answer.sources} for c in answer.citations)
