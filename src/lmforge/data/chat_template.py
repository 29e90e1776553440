"""Chat templates as Hugging Face writes them: lmforge's own as Jinja, and any model's rendered with
jinja2 exactly as `transformers` does, returning `(ids, assistant_mask)`.

CHAT_TEMPLATE is render_chat as a Jinja `chat_template`; write_tokenizer_config puts it in a run's
tokenizer_config.json. render_template renders any HF template; chat_renderer(model_dir, tokenizer)
picks render_chat for lmforge runs and a checkpoint's own template otherwise. The mask comes from
`{% generation %}`, else prefix by prefix (render_template); a template that is not prefix-stable
is refused with a message to add the tag (docs/alignment.md, *The chat format*).
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left, bisect_right
from functools import lru_cache
from pathlib import Path

from lmforge.data.chat import ROLES, render_chat
from lmforge.io import atomic_write_json, read_json

# render_chat in Jinja. Tool-call arguments given as a dict are dumped as render_chat does; given
# as a string (the OpenAI shape) they are inserted verbatim, which equals render_chat's re-dumped
# text for canonical JSON (what `json.dumps` and OpenAI clients write; the world's data is so).
CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('role ' ~ message['role'] ~ ' is not one of system, user, assistant, tool') }}{% endif %}"
    "{{ '<|' ~ message['role'] ~ '|>' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] or '' }}"
    "{% for call in message.get('tool_calls') or [] %}"
    "{% set args = call['function']['arguments'] %}"
    "{{ '<|tool_call|>{\"name\": ' ~ call['function']['name'] | tojson ~ ', \"arguments\": ' }}"
    "{% if args is string %}{{ args if args | trim else '{}' }}{% else %}{{ args | tojson }}{% endif %}"
    "{{ '}<|/tool_call|>' }}"
    "{% endfor %}"
    "{{ '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ (message['content'] or '') ~ '<|end|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _token_name(tokenizer, token_id: int | None) -> str | None:
    if token_id is None:
        return None
    return next(s for s, i in tokenizer.special_tokens.items() if i == token_id)


def write_tokenizer_config(tokenizer, run_dir: str | Path, model_max_length: int) -> None:
    """Write run_dir/tokenizer_config.json (CHAT_TEMPLATE, bos/eos/pad) and special_tokens_map.json,
    so `transformers.AutoTokenizer.from_pretrained(run_dir)` loads tokenizer.json and
    `apply_chat_template` gives render_chat's ids and mask."""
    run_dir = Path(run_dir)
    names = {key: _token_name(tokenizer, i) for key, i in
             (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id), ("pad_token", tokenizer.pad_id))}
    names = {k: v for k, v in names.items() if v is not None}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": int(model_max_length),
              "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE, **names}
    atomic_write_json(run_dir / "tokenizer_config.json", config)
    atomic_write_json(run_dir / "special_tokens_map.json", names)


@lru_cache(maxsize=16)
def _compile(template: str):
    """The template compiled in transformers' environment: sandboxed, trim/lstrip blocks,
    `raise_exception`, a non-HTML-escaping `tojson`, and `{% generation %}` recording char spans."""
    import jinja2  # only to render Hub templates
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTracker(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            text = caller()
            return f"\x00GEN\x01{text}\x00/GEN\x01"  # sentinels, cut out (and their spans kept) after rendering

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTracker, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_text(template: str, messages: list[dict], special_tokens: dict, add_generation_prompt: bool = False,
                tools=None) -> tuple[str, list[tuple[int, int]]]:
    """Render to text; returns (text, [(start, end) char spans of each {% generation %} block])."""
    import jinja2  # only to render Hub templates

    try:
        raw = _compile(template).render(messages=messages, tools=tools, documents=None,
                                        add_generation_prompt=add_generation_prompt, **special_tokens)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template: {e}") from None
    text, spans, pos = [], [], 0
    for piece in raw.split("\x00"):
        if piece.startswith("GEN\x01"):
            piece, start = piece[4:], pos
        elif piece.startswith("/GEN\x01"):
            piece = piece[5:]
            spans.append((start, pos))
        text.append(piece)
        pos += len(piece)
    return "".join(text), spans


def _encode_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Encode as HF does a rendered chat (special-token text becomes special ids); returns the ids
    and each token's (start, end) char span (a token cutting a character in two covers all of it)."""
    ids = tokenizer.encode(text, allowed_special="all")
    starts = [0]  # byte offset where each character starts
    for ch in text[:-1]:
        starts.append(starts[-1] + len(ch.encode("utf-8")))
    offsets, b = [], 0
    for t in ids:
        n = len(tokenizer.token_bytes(t))
        offsets.append((bisect_right(starts, b) - 1, bisect_left(starts, b + n)))
        b += n
    return ids, offsets


def _mask_from_spans(offsets, spans) -> list[int]:
    """1 on every token overlapping a span (transformers' rule for return_assistant_tokens_mask)."""
    return [int(any(t_start < e and t_end > s for s, e in spans)) for t_start, t_end in offsets]


def _prefix_spans(template, messages, special_tokens, tools, text, tokenizer) -> list[tuple[int, int]]:
    """Assistant spans by rendering the conversation prefix by prefix (see the module docstring)."""
    specials = sorted(tokenizer.special_tokens, key=len, reverse=True)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before, _ = render_text(template, messages[:i], special_tokens, True, tools)
        upto, _ = render_text(template, messages[: i + 1], special_tokens, False, tools)
        if not (text.startswith(before) and text.startswith(upto) and len(upto) >= len(before)):
            raise ValueError(f"message {i}: the chat template is not prefix-stable (a turn renders differently once "
                             f"later turns follow), so the assistant mask cannot be found by prefixes; "
                             f"add {{% generation %}}...{{% endgeneration %}} around the assistant's part")
        piece = upto[len(before):]
        cut = max((piece.rfind(s) + len(s) for s in specials if s in piece), default=len(piece.rstrip()))
        spans.append((len(before), len(before) + cut))
    return spans


def render_template(template: str, tokenizer, messages: list[dict], special_tokens: dict,
                    add_generation_prompt: bool = False, tools=None) -> tuple[list[int], list[int]]:
    """A Hugging Face chat template -> (ids, assistant mask), as `apply_chat_template(messages,
    tokenize=True, return_assistant_tokens_mask=True)` gives them. `special_tokens`: bos_token,
    eos_token, ... as the template expects them (tokenizer_config.json's values).

    Without `{% generation %}` (most Hub templates): for each assistant message i, messages[:i]
    with the generation prompt (P) and messages[:i+1] (N) must both render as prefixes of the
    whole conversation's text; the assistant's span is text[len(P):len(N)], cut after its last
    special token (the end-of-turn, e.g. `<|im_end|>`), so a trailing newline is not supervised."""
    text, spans = render_text(template, messages, special_tokens, add_generation_prompt, tools)
    if not _has_generation_tag(template):
        spans = _prefix_spans(template, messages, special_tokens, tools, text, tokenizer)
    ids, offsets = _encode_with_offsets(tokenizer, text)
    return ids, _mask_from_spans(offsets, spans)


def _has_generation_tag(template: str) -> bool:
    return re.search(r"{%-?\s*generation\s*-?%}", template) is not None


def _special_tokens_map(config: dict) -> dict:
    """tokenizer_config.json's bos/eos/pad/unk tokens as strings (they may be {"content": ...} dicts)."""
    out = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        v = config.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        if v is not None:
            out[key] = v
    return out


def chat_renderer(model_dir: str | Path, tokenizer):
    """render(messages, add_generation_prompt=False) -> (ids, mask) for a model directory.

    An lmforge run directory (its tokenizer_config.json holds CHAT_TEMPLATE, or it has none and
    its config.json is lmforge's) uses render_chat; a Hugging Face checkpoint directory uses its own
    `chat_template`, rendered as transformers does (ValueError when it has none).
    """
    model_dir = Path(model_dir)
    config_path = model_dir / "tokenizer_config.json"
    tok_config = read_json(config_path) if config_path.is_file() else {}
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    is_hf = "model_type" in (read_json(model_dir / "config.json") if (model_dir / "config.json").is_file() else {})
    if template == CHAT_TEMPLATE or (template is None and not is_hf):
        return lambda messages, add_generation_prompt=False: render_chat(tokenizer, messages, add_generation_prompt)
    if template is None:
        raise ValueError(f"{config_path}: no chat template; add a \"chat_template\" field (a Jinja string, e.g. the "
                         f"instruct model's) to tokenizer_config.json, or a chat_template.jinja file beside it")
    special = _special_tokens_map(tok_config)

    def render(messages, add_generation_prompt=False, tools=None):
        _check_messages(messages)
        return render_template(template, tokenizer, messages, special, add_generation_prompt, tools)

    return render


def _check_messages(messages) -> None:
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"message {i}: expected a dict with a role in {ROLES}, got {m!r:.80}")
