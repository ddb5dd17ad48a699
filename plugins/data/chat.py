"""`chat`: chat / agent-trajectory JSON lines rendered with the tokenizer's chat template, with loss masks."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lcplug.data.base import DataContext, Piece, Source, SourcePlugin
from lcplug.data.files import FileSource
from lcplug.data.tokenize import TextTokenizer
from lcplug.hookspecs import hookimpl
from lcplug.params import Params, param


@dataclass(frozen=True)
class ChatParams(Params):
    paths: list[str] = param(help="JSON-lines files (or directories / glob patterns of them), one session per line")
    field: str = param("messages", "the field holding the list of messages ({role, content, tool_calls?})")
    tools_field: str = param("tools", "the field holding the session's tool schemas, if any")
    train_on: Literal["assistant", "all"] = param(
        "assistant", "assistant: loss on assistant turns only (prompts, tool results, headers masked); all: every token"
    )
    shuffle: bool = param(True, "file order seeded per epoch")


def render_plain(messages: Sequence[dict[str, Any]], tools: Any, add_generation_prompt: bool) -> str:
    """The rendering used when the tokenizer has no chat template (e.g. bytes): `<|role|>` headers, JSON tool calls."""
    out = [f"<|system|>\nTools: {json.dumps(tools)}\n"] if tools else []
    for m in messages:
        body = m.get("content") or ""
        for call in m.get("tool_calls") or []:
            body += f"<tool_call>{json.dumps(call)}</tool_call>"
        out.append(f"<|{m.get('role', 'user')}|>\n{body}\n")
    if add_generation_prompt:
        out.append("<|assistant|>\n")
    return "".join(out)


class Renderer:
    """Renders a session and splits it into segments: what each turn added, and whether it is trained on.

    The whole session is rendered once; turn i ends where the rendering of messages[:i+1] stops agreeing
    with it (all of it, for the usual prefix-stable template), and an assistant turn's header ends where
    the generation prompt after messages[:i] does, so headers are context, not targets. The segments
    always add up to the whole rendering, even for a template that rewrites earlier turns.
    """

    def __init__(self, tokenizer: TextTokenizer, train_on: str):
        self.tokenizer = tokenizer
        self.train_on = train_on
        hf = tokenizer.hf
        self.template = hf is not None and getattr(hf, "chat_template", None) is not None

    def render(self, messages: Sequence[dict[str, Any]], tools: Any, add_generation_prompt: bool = False) -> str:
        if not messages and not add_generation_prompt:
            return ""
        if self.template:
            return self.tokenizer.hf.apply_chat_template(
                list(messages), tools=tools or None, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        return render_plain(messages, tools, add_generation_prompt)

    def segments(self, messages: Sequence[dict[str, Any]], tools: Any) -> list[tuple[str, bool]]:
        """The whole rendering cut into (text, trained) segments at the turn boundaries."""
        full = self.render(messages, tools)
        everything = self.train_on == "all"
        out: list[tuple[str, bool]] = []
        pos = 0
        for i, message in enumerate(messages):
            assistant = message.get("role") == "assistant"
            if assistant:  # its header (the generation prompt) is context, not target
                end = _shared(self.render(messages[:i], tools, add_generation_prompt=True), full)
                out.append((full[pos:end], everything))
                pos = max(pos, end)
            end = _shared(self.render(messages[: i + 1], tools), full)
            out.append((full[pos:end], assistant or everything))
            pos = max(pos, end)
        out.append((full[pos:], everything))
        return [(text, trained) for text, trained in out if text]


def _shared(prefix: str, full: str) -> int:
    """How many leading characters `prefix` shares with `full` (all of it for a prefix-stable template)."""
    if full.startswith(prefix):
        return len(prefix)
    low, high = 0, min(len(prefix), len(full))
    while low < high:
        mid = (low + high + 1) // 2
        if full.startswith(prefix[:mid]):
            low = mid
        else:
            high = mid - 1
    return low


class ChatSource(FileSource):
    """One document per session (JSON line); a session that cannot be rendered is skipped and counted."""

    def __init__(self, name: str, params: ChatParams, tokenizer: TextTokenizer, **kwargs: Any):
        super().__init__(name, params.paths, shuffle=params.shuffle, **kwargs)
        self.params = params
        self.renderer = Renderer(tokenizer, params.train_on)
        self.tokenizer = tokenizer

    def record(self, record: Any, where: str, group: str) -> Piece | None:
        messages = record.get(self.params.field) if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            self.skip(f"no message list {self.params.field!r}", where)
            return None
        try:
            segments = self.renderer.segments(messages, record.get(self.params.tools_field))
        except Exception as exc:  # a template error on one malformed session must not stop the epoch
            self.skip("unrenderable session", f"{where} ({type(exc).__name__}: {str(exc).splitlines()[0]})")
            return None
        ids, mask = self.tokenizer.encode_segments(segments)
        return Piece(ids=ids, mask=mask, group=group)


class Chat(SourcePlugin):
    """Chat and agent-trajectory sessions (JSON lines of `{"messages": [...], "tools": [...]}`) as long documents.

    Each session is rendered with the tokenizer's chat template (tool calls and tool results included;
    a plain `<|role|>` rendering when the tokenizer has none) and tokenized whole; with
    `train_on: assistant` the loss mask keeps only what the assistant turns add, so prompts, tool
    outputs and turn headers are context, not targets.
    """

    name = "chat"
    Params = ChatParams

    def build_source(self, ctx: DataContext, name: str) -> Source:
        return ChatSource(name, self.params, ctx.tokenizer, seed=ctx.seed, rank=ctx.rank, world=ctx.world)


@hookimpl
def lcplug_register(register):
    register(Chat)
