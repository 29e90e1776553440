"""`lmforge ask` and `lmforge rag index|search|ask`: thin wrappers on lmforge.prompting.

Both `ask` verbs run on the local engine (`--run`) or, with `--backend openai`, on any
OpenAI-compatible server through the official client (lmforge.prompting.openai_backend)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from lmforge.cli import UserError, add_command
from lmforge.prompting import prompts, rag


def register(subparsers):
    _register_ask(subparsers)
    parser = add_command(subparsers, "rag", "retrieval-augmented generation on one SQLite index")
    parser.set_defaults(_parser=parser)
    sub = parser.add_subparsers(title="commands", metavar="<command>")
    _register_rag_index(sub)
    _register_rag_search(sub)
    _register_rag_ask(sub)


def _register_ask(subparsers):
    p = add_command(subparsers, "ask", "answer one question with a prompting strategy: few-shot, chain-of-thought, self-consistency, system prompt",
                    func=cmd_ask)
    p.add_argument("question", help="the question")
    add_backend_flags(p)
    p.add_argument("--shots", type=int, default=0, help="worked examples before the question")
    p.add_argument("--similar", action="store_true", help="choose the shots most similar to the question (default: at random)")
    p.add_argument("--examples", default=None,
                   help="JSONL of {\"question\", \"answer\"} shots (default: the built-in world's training questions)")
    p.add_argument("--cot", action="store_true", help="chain-of-thought: add the trigger 'Think step by step.' and extract the final answer")
    p.add_argument("--samples", type=int, default=1, help="self-consistency: sample this many chains and take the majority answer")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature with --samples > 1 (one sample is greedy)")
    p.add_argument("--system", default=None, help="system prompt (the question then goes through the chat template)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="stop after this many new tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of the shot choice and of sampling")
    p.add_argument("--tools", default=None,
                   help="comma-separated tools the model may call (calculator, python, search): runs the tool-call loop")
    p.add_argument("--db", default=None, help="the RAG index the search tool reads")
    p.add_argument("--max-tool-calls", type=int, default=4, help="stop the tool loop after this many calls")
    p.add_argument("--device", default="cpu", help="torch device")


def _register_rag_index(sub):
    p = add_command(sub, "index", "index .txt, .md, .jsonl files and directories (incremental: changed documents re-chunked, deleted ones removed)",
                    func=cmd_index)
    p.add_argument("--docs", nargs="+", required=True, help="files and directories to index")
    p.add_argument("--db", required=True, help="the SQLite index file (created when absent)")
    p.add_argument("--chunk-tokens", type=int, default=200, help="tokens (words and punctuation) per chunk at most")
    p.add_argument("--overlap", type=int, default=40, help="tokens repeated from the previous chunk, whole sentences")
    embed = p.add_mutually_exclusive_group()
    embed.add_argument("--embed-run", default=None,
                       help="embed with the mean-pooled hidden states of this run (default: the built-in hashed n-gram TF-IDF)")
    embed.add_argument("--embed-model", default=None,
                       help="embed with this local sentence-transformers model directory (pip install sentence-transformers)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _register_rag_search(sub):
    p = add_command(sub, "search", "print the best chunks for a query, with their scores", func=cmd_search)
    p.add_argument("query", help="what to look for (any text: punctuation is safe)")
    p.add_argument("--db", required=True, help="the SQLite index file")
    p.add_argument("--k", type=int, default=5, help="how many chunks")
    p.add_argument("--mode", choices=["hybrid", "bm25", "vector"], default="hybrid", help="ranking: RRF of BM25 and vectors, or one of them")
    p.add_argument("--json", action="store_true", help="one JSON object per hit")
    p.add_argument("--vector-backend", choices=list(rag.VECTOR_BACKENDS), default=None,
                   help=f"vector search: numpy (in memory), sqlite-vec (plain-cosine embedders) or auto; "
                        f"none: ${rag.VECTOR_BACKEND_ENV}, else auto")


def _register_rag_ask(sub):
    p = add_command(sub, "ask", "answer from retrieved sources, with citations; says when the documents do not contain the answer",
                    func=cmd_rag_ask)
    p.add_argument("question", help="the question")
    add_backend_flags(p)
    p.add_argument("--db", required=True, help="the SQLite index file")
    p.add_argument("--k", type=int, default=3, help="sources in the prompt (trimmed to fit the context)")
    p.add_argument("--mode", choices=["hybrid", "bm25", "vector"], default="hybrid", help="retrieval ranking")
    p.add_argument("--threshold", type=float, default=rag.DEFAULT_THRESHOLD,
                   help="answer only when the best source's BM25 score reaches this (docs/prompting.md)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="stop after this many new tokens")
    p.add_argument("--chat", action="store_true",
                   help="the grounded prompt is a user turn of the chat template (an SFT model); else a completion ending in 'A:'")
    p.add_argument("--answer", choices=list(rag.ANSWER_MODES), default="generate",
                   help="generate: the model writes the reply; extract: the reply is the source sentence the model scores "
                        "highest, question against no question (local backend only; docs/prompting.md)")
    p.add_argument("--device", default="cpu", help="torch device")


def add_backend_flags(p):
    p.add_argument("--backend", choices=["local", "openai"], default="local",
                   help="local: the engine on --run; openai: an OpenAI-compatible server (lmforge serve, vLLM, a hosted API)")
    p.add_argument("--run", default=None, help="run directory (config.json, model.safetensors, tokenizer.json); --backend local")
    p.add_argument("--base-url", default=None,
                   help="--backend openai: the API's base URL, e.g. http://127.0.0.1:8000/v1 (none: $OPENAI_BASE_URL, else OpenAI's)")
    p.add_argument("--model", default=None, help="--backend openai: the model name (none: the first the server lists)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="--backend openai: the environment variable holding the API key")


def _remote(args):
    """The OpenAI backend of --backend openai, or None for the local engine (which needs --run)."""
    if args.backend == "local":
        if args.run is None:
            raise UserError("--run is required with --backend local (or use --backend openai --base-url URL)")
        return None
    if args.run is not None:
        raise UserError("--run is for --backend local; with --backend openai name the model with --model")
    from lmforge.prompting.openai_backend import OpenAIBackend

    return OpenAIBackend(args.base_url, args.model, args.api_key_env)


def _engine(run: str, device: str):
    from lmforge.infer import load_run  # torch and the model: only for the commands that generate
    from lmforge.infer.engine import Engine

    model, tok = load_run(run, device=device)
    return Engine(model, tok)


def _examples(path: str | None, seed: int) -> list[tuple[str, str]]:
    if path is None:
        from lmforge.data.world import World

        return [(q, a) for _, _, q, a in World(seed).encyclopedia.train_questions]
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            out.append((str(d["question"]), str(d["answer"])))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path}:{n}: expected a JSON object with 'question' and 'answer' ({e})") from None
    return out


def cmd_ask(args) -> int:
    from lmforge.infer.sampling import SamplingParams

    remote = _remote(args)
    if args.tools:
        return _ask_with_tools(args, remote)
    shots = prompts.select_examples(args.question, _examples(args.examples, args.seed), args.shots, args.seed, args.similar) if args.shots else []
    if remote is not None:
        return _ask_remote(args, remote, shots)
    engine = _engine(args.run, args.device)
    question = f"{args.question.strip()} {prompts.COT_TRIGGER}" if args.cot else args.question
    if args.system:
        prompt = prompts.chat_prompt(engine.tokenizer, question, args.system, shots)
        stop = []
    else:
        prompt = "\n".join([prompts.SHOT_TEMPLATE.format(question=q, answer=a) for q, a in shots] + [prompts.zero_shot(question)])
        stop = ["\n"]
    if args.samples > 1:
        vote = prompts.self_consistency(engine, prompt, n=args.samples, temperature=args.temperature,
                                        max_new_tokens=args.max_new_tokens, stop=stop, seed=args.seed)
        return _print_vote(vote)
    text = engine.generate(prompt, SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0, stop=stop)).text.strip()
    return _print_answer(text, args.cot)


def _print_vote(vote: prompts.Vote) -> int:
    for i, (c, a) in enumerate(zip(vote.completions, vote.answers), 1):
        print(f"[{i}] {c.strip()}  -> {a}")
    print(f"answer: {vote.answer} (confidence {vote.confidence:.0%}, {len(vote.answers)} samples)")
    return 0


def _print_answer(text: str, cot: bool) -> int:
    print(text)
    if cot:
        print(f"answer: {prompts.extract_answer(text)}")
    return 0


def _ask_remote(args, remote, shots) -> int:
    """`ask` through the chat API: shots as earlier turns, the system prompt as the system turn."""
    from lmforge.prompting import openai_backend

    messages = openai_backend.question_messages(args.question, args.system, shots, args.cot)
    if args.samples > 1:
        return _print_vote(openai_backend.self_consistency(remote, messages, n=args.samples, temperature=args.temperature,
                                                           max_tokens=args.max_new_tokens, seed=args.seed))
    return _print_answer(remote.complete(messages, args.max_new_tokens, seed=args.seed).strip(), args.cot)


def _tool_registry(names: str, db: str | None):
    """The built-in tools named in `--tools calculator,python,search`."""
    from lmforge.prompting import tools

    try:
        return tools.builtin_registry(names.split(","), db)
    except ValueError as e:
        raise UserError(f"--tools {e}") from None


def _ask_with_tools(args, remote) -> int:
    """The tool-call loop: locally inside generation, or with the remote model's tool_calls."""
    if args.shots or args.cot or args.samples > 1:
        raise UserError("--tools answers the question in one conversation: it does not combine with --shots, --cot or --samples")
    registry = _tool_registry(args.tools, args.db)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.question}]
    if remote is not None:
        from lmforge.prompting import openai_backend

        result = openai_backend.run_with_tools(remote, messages, registry, max_iterations=args.max_tool_calls,
                                               max_tokens=args.max_new_tokens, seed=args.seed)
    else:
        from lmforge.infer.sampling import SamplingParams
        from lmforge.prompting import tools

        result = tools.run_with_tools(_engine(args.run, args.device), messages, registry,
                                      SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0), max_iterations=args.max_tool_calls)
    for c in result.tool_calls:
        shown = c["arguments"] if isinstance(c["arguments"], str) else json.dumps(c["arguments"], ensure_ascii=False)
        print(f"[tool] {c['name']}({shown}) -> {c['result']}")
    last = result.messages[-1]
    if last["role"] == "assistant" and not last.get("tool_calls"):
        print(last["content"])
    if result.finish_reason == "iterations":
        print(f"(stopped after {len(result.tool_calls)} tool call(s): --max-tool-calls)")
    return 0


def cmd_index(args) -> int:
    t0 = time.time()
    embedder = None
    if args.embed_run:
        from lmforge.prompting.embed import HiddenStateEmbedder

        embedder = HiddenStateEmbedder(args.embed_run)
    elif args.embed_model:
        from lmforge.prompting.embed import SentenceTransformerEmbedder

        embedder = SentenceTransformerEmbedder(args.embed_model)
    s = rag.index(args.db, args.docs, chunk_tokens=args.chunk_tokens, overlap=args.overlap, embedder=embedder,
                  progress=not args.no_progress)
    dt = time.time() - t0
    print(f"indexed {args.db}: {s.documents:,} documents, {s.chunks:,} chunks ({s.added} added, {s.updated} updated, "
          f"{s.removed} removed, {s.unchanged} unchanged) in {dt:.1f} s")
    return 0


def cmd_search(args) -> int:
    for i, h in enumerate(rag.search(args.db, args.query, args.k, args.mode, args.vector_backend), 1):
        if args.json:
            print(json.dumps({"rank": i, "score": h.score, "bm25": h.bm25, "cosine": h.cosine, "doc_id": h.doc_id,
                              "title": h.title, "path": h.path, "text": h.text}, ensure_ascii=False))
        else:
            bm = f"{h.bm25:.3f}" if h.bm25 is not None else "-"
            print(f"{i}. [{h.score:.4f}] {h.title} ({h.doc_id}; bm25 {bm}, cosine {h.cosine:.3f})\n   {' '.join(h.text.split())}")
    return 0


def cmd_rag_ask(args) -> int:
    if args.answer != "generate" and args.backend != "local":
        raise UserError("--answer extract scores the sources' sentences with the local model; an OpenAI-compatible "
                        "server does not return prompt log-probabilities (use --backend local)")
    remote = _remote(args)
    if remote is not None:
        from lmforge.prompting import openai_backend

        a = openai_backend.rag_ask(remote, args.db, args.question, k=args.k, threshold=args.threshold, mode=args.mode,
                                   max_tokens=args.max_new_tokens)
    else:
        a = rag.ask(_engine(args.run, args.device), args.db, args.question, k=args.k, threshold=args.threshold, mode=args.mode,
                    max_new_tokens=args.max_new_tokens, chat=args.chat, answer=args.answer)
    print(a.text)
    for c in a.citations:
        print(f"[{c.number}] {c.title} ({c.doc_id}, {c.path})")
    if a.dropped_sources:
        print(f"({a.dropped_sources} source(s) dropped to fit the context)")
    return 0
