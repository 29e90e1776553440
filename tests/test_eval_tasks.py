"""lmforge.eval.tasks: batched greedy answers through the engine equal a plain greedy loop, and
the scores are the items' own scores of those answers."""


import pytest
import torch

from lmforge.data.world import EvalItem, World
from lmforge.eval.tasks import evaluate_tasks, load_tasks, score_table
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import train as train_tokenizer


@pytest.fixture(scope="module")
def model_and_tokenizer():
    w = World(0)
    text = "\n".join(next(w.documents(k)) for k in ("arithmetic", "translation", "qa") for _ in range(40))
    tok = train_tokenizer(text, vocab_size=400)
    cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, n_layer=1, n_embd=64, n_head=2)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    return model.eval(), tok


def greedy_reference(model, tok, item: EvalItem) -> str:
    """Cache-less greedy decoding, cut before the first stop string (what the engine returns)."""
    ids = tok.encode(item.prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(item.max_new_tokens):
            logits, _ = model(torch.tensor([ids + out]))
            nxt = int(logits[0, -1].argmax())
            if nxt == tok.eos_id:
                break
            out.append(nxt)
            text = tok.decode(out)
            cut = min((text.find(s) for s in item.stop if s in text), default=-1)
            if cut >= 0:
                return text[:cut]
    return tok.decode(out)


def test_engine_answers_equal_a_plain_greedy_loop(model_and_tokenizer):
    model, tok = model_and_tokenizer
    sets = World(0).tasks(6)
    tasks = {k: sets[k] for k in ("addition_2digit", "translation_4shot", "closed_book")}
    results = evaluate_tasks(model, tok, tasks, batch_size=4, n_examples=6)
    for name, items in tasks.items():
        r = results[name]
        assert r.n == len(items) == len(r.examples)
        for item, ex in zip(items, r.examples):
            assert ex["prediction"] == greedy_reference(model, tok, item), (name, item.prompt)
            s = item.score(ex["prediction"])
            assert (ex["exact"], ex["normalised"]) == (s["exact"], s["normalised"])
        assert r.exact == sum(e["exact"] for e in r.examples) / r.n
    table = score_table(results)
    assert all(name in table for name in tasks)


def test_tool_use_runs_the_tool_loop(model_and_tokenizer):
    """tool_use items are answered by the tool-call loop (the final assistant reply is scored);
    a tokenizer without the tool-call tokens gets a reason instead of a crash."""
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams
    from lmforge.prompting.tools import ToolRegistry, calculator_tool, run_with_tools

    model, tok = model_and_tokenizer
    items = World(0).tasks(2)["tool_use"]
    results = evaluate_tasks(model, tok, {"tool_use": items}, n_examples=2)
    assert results["tool_use"].n == 2 and not results["tool_use"].skipped
    engine, registry = Engine(model, tok), ToolRegistry([calculator_tool()])
    for item, ex in zip(items, results["tool_use"].examples):
        last = run_with_tools(engine, list(item.prompt), registry, SamplingParams(max_new_tokens=64, temperature=0.0)).messages[-1]
        assert ex["prediction"] == ((last.get("content") or "") if last["role"] == "assistant" else "")
        assert ex["exact"] == item.score(ex["prediction"])["exact"]


def test_load_tasks_reads_back_what_generate_wrote(tmp_path):
    from lmforge.data.world import generate

    generate(tmp_path, size="30KB", seed=1, progress=False, n_eval=5)
    tasks = load_tasks(tmp_path)
    assert {k: [i.to_dict() for i in v] for k, v in tasks.items()} == \
           {k: [i.to_dict() for i in v] for k, v in World(1).tasks(5).items()}
    assert list(load_tasks(tmp_path, ["fewshot"])) == ["fewshot"]
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        load_tasks(tmp_path, ["nope"])
    with open(tmp_path / "eval" / "fewshot.jsonl", "a") as f:
        f.write('{"task": "fewshot", "bogus": 1}\n')
    with pytest.raises(ValueError, match=r"fewshot.jsonl:6"):
        load_tasks(tmp_path, ["fewshot"])
    with pytest.raises(FileNotFoundError):
        load_tasks(tmp_path / "missing")


def test_tool_index_holds_the_worlds_documents(tmp_path):
    """The search tool's index for tool_use items: World(seed)'s articles, or a world dir's file,
    found by their titles; removed when the block ends."""
    from lmforge.eval.tasks import tool_index
    from lmforge.prompting import rag

    docs = World(0).rag_documents()
    with tool_index(None, seed=0) as db:
        assert db.is_file()
        for d in docs[:3]:
            assert rag.search(db, d["title"], k=1)[0].title == d["title"]
    assert not db.exists()
    (tmp_path / "rag").mkdir()
    (tmp_path / "rag" / "documents.jsonl").write_text('{"id": "d1", "title": "Zorbel", "text": "Zorbel is a blue town."}\n')
    with tool_index(tmp_path) as db:
        assert [h.title for h in rag.search(db, "Zorbel", k=5)] == ["Zorbel"]
