#!/usr/bin/env python3
"""Golden fixtures for the `oxtune-data` crate, produced by the reference implementations.

Token ids come from OpenAI's `openai-harmony` renderer and parser (PyPI) and from
`tiktoken`; nothing here is computed by oxtune. The loss spans are derived from
harmony alone: a trained span starts where `render_conversation_for_completion`
of the preceding messages ends (that is, after the `<|start|>assistant` the
inference engine writes) and ends where the rendering of the span's last message
ends. The script asserts that every such prompt is a prefix of the training
rendering, so the spans are exactly "what the model generates".

The mapping from the JSONL formats to harmony messages is written out below,
independently of the Rust code, and is the documented contract of the crate:
  * a leading `system` (or `developer`) message becomes the developer message
    `# Instructions\n\n{content}` (the gpt-oss chat template writes an extra
    trailing blank line; harmony does not, and harmony defines the token ids);
  * the harmony system message comes from the render options (harmony defaults);
  * an assistant message renders as [analysis(thinking)], then its content on
    `final` (or on `commentary` when it also has tool calls: a preamble), then one
    `commentary` message per tool call to `functions.NAME` with content type
    `<|constrain|>json`; tool results render as `functions.NAME to=assistant` on
    `commentary`;
  * analysis is kept only for assistant messages after the last user message
    (earlier turns drop their chain of thought, as at inference time).

Run offline: the o200k ranks are taken from the tiktoken-rs crate's `assets/`.

    /work/pyenv/bin/python scripts/data_fixtures.py
"""

import base64
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "fixtures", "data")


def ranks_dir() -> str:
    pattern = os.path.expanduser("~/.cargo/registry/src/*/tiktoken-rs-0.12.*/assets/o200k_base.tiktoken")
    found = sorted(glob.glob(pattern))
    if not found:
        sys.exit(f"no o200k_base.tiktoken under {pattern}; run `cargo fetch` in the workspace first")
    return os.path.dirname(found[-1])


os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", ranks_dir())

import tiktoken  # noqa: E402
from openai_harmony import (  # noqa: E402
    Author,
    ChannelConfig,
    Conversation,
    DeveloperContent,
    HarmonyEncodingName,
    Message,
    ReasoningEffort,
    RenderConversationConfig,
    Role,
    SystemContent,
    ToolDescription,
    load_harmony_encoding,
)

ENC = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
KEEP = RenderConversationConfig(auto_drop_analysis=False)
EFFORT = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}


# ---------------------------------------------------------------------------
# JSONL formats -> OpenAI-style message lists
# ---------------------------------------------------------------------------

def to_messages(example: dict) -> list[dict]:
    if "messages" in example:
        return example["messages"]
    if "conversations" in example:
        role = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
        return [{"role": role[t["from"]], "content": t["value"]} for t in example["conversations"]]
    if "instruction" in example:
        msgs = []
        if example.get("system"):
            msgs.append({"role": "system", "content": example["system"]})
        user = example["instruction"]
        if example.get("input"):
            user = user + "\n\n" + example["input"]
        msgs.append({"role": "user", "content": user})
        msgs.append({"role": "assistant", "content": example["output"]})
        return msgs
    if "prompt" in example:
        p, c = example["prompt"], example["completion"]
        prompt = [{"role": "user", "content": p}] if isinstance(p, str) else p
        completion = [{"role": "assistant", "content": c}] if isinstance(c, str) else c
        return prompt + completion
    raise ValueError(f"unknown format: {example}")


def text_of(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content)


# ---------------------------------------------------------------------------
# message lists -> harmony messages (with the owning source index and kind)
# ---------------------------------------------------------------------------

def system_message(cfg: dict, effort: str | None, has_tools: bool) -> Message:
    sc = SystemContent.new()
    if "model_identity" in cfg:
        sc = sc.with_model_identity(cfg["model_identity"])
    if "knowledge_cutoff" in cfg:
        sc = sc.with_knowledge_cutoff(cfg["knowledge_cutoff"])
    if cfg.get("current_date"):
        sc = sc.with_conversation_start_date(cfg["current_date"])
    effort = effort or cfg.get("reasoning_effort", "medium")
    sc = sc.with_reasoning_effort(EFFORT[effort])
    if "valid_channels" in cfg:
        sc = sc.with_channel_config(ChannelConfig.require_channels(cfg["valid_channels"]))
    return Message.from_role_and_content(Role.SYSTEM, sc)


def to_harmony(example: dict, cfg: dict) -> list[tuple[Message, str]]:
    """Returns (message, kind) pairs; kind is 'prompt', 'assistant' or 'final'."""
    msgs = to_messages(example)
    tools = example.get("tools") or []
    out = [(system_message(cfg, example.get("reasoning_effort"), bool(tools)), "prompt")]
    instructions = None
    if msgs and msgs[0]["role"] in ("system", "developer"):
        instructions = text_of(msgs[0]["content"])
        msgs = msgs[1:]
    if instructions is not None or tools:
        dev = DeveloperContent.new()
        if instructions is not None:
            dev = dev.with_instructions(instructions)
        if tools:
            dev = dev.with_function_tools([
                ToolDescription.new(t["function"]["name"], t["function"].get("description", ""),
                                    parameters=t["function"].get("parameters"))
                for t in tools
            ])
        out.append((Message.from_role_and_content(Role.DEVELOPER, dev), "prompt"))
    last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=-1)
    call_names = {}
    for i, m in enumerate(msgs):
        if m["role"] == "user":
            out.append((Message.from_role_and_content(Role.USER, text_of(m["content"])), "prompt"))
        elif m["role"] == "assistant":
            calls = m.get("tool_calls") or []
            if m.get("thinking") and i > last_user:
                out.append((Message.from_role_and_content(Role.ASSISTANT, m["thinking"]).with_channel("analysis"),
                            "assistant"))
            content = text_of(m.get("content"))
            if content:
                channel = "commentary" if calls else "final"
                out.append((Message.from_role_and_content(Role.ASSISTANT, content).with_channel(channel),
                            "final" if channel == "final" else "assistant"))
            for c in calls:
                fn = c["function"]
                args = fn["arguments"]
                if not isinstance(args, str):
                    args = json.dumps(args, ensure_ascii=False, separators=(",", ":"))
                if "id" in c:
                    call_names[c["id"]] = fn["name"]
                out.append((Message.from_role_and_content(Role.ASSISTANT, args)
                            .with_channel("commentary")
                            .with_recipient("functions." + fn["name"])
                            .with_content_type("<|constrain|>json"), "assistant"))
        elif m["role"] == "tool":
            name = m.get("name") or call_names[m["tool_call_id"]]
            out.append((Message.from_author_and_content(Author.new(Role.TOOL, "functions." + name),
                                                        text_of(m["content"]))
                        .with_recipient("assistant").with_channel("commentary"), "prompt"))
        else:
            raise ValueError(m["role"])
    return out


def conv(hm) -> Conversation:
    return Conversation.from_messages([m for m, _ in hm])


def spans(hm, full: list[int], policy: str) -> list[list[int]]:
    """Trained [start, end) spans from harmony renderings of prefixes."""
    kinds = [k for _, k in hm]
    n = len(hm)
    # first harmony index of the last turn: after the last user message
    last_user = max(i for i, (m, _) in enumerate(hm) if m.author.role == Role.USER)

    def prompt_len(i):
        p = ENC.render_conversation_for_completion(conv(hm[:i]), Role.ASSISTANT, KEEP)
        assert full[:len(p)] == p, "prompt is not a prefix of the training rendering"
        return len(p)

    def end_len(i):  # after message i-1
        return len(full) if i == n else len(ENC.render_conversation(conv(hm[:i]), KEEP))

    out = []
    if policy == "final":
        for i in range(last_user + 1, n):
            if kinds[i] == "final":
                out.append([prompt_len(i), end_len(i + 1)])
        return out
    i = 0 if policy == "all" else last_user + 1
    while i < n:
        if kinds[i] == "prompt":
            i += 1
            continue
        j = i
        while j < n and kinds[j] != "prompt":
            j += 1
        out.append([prompt_len(i), end_len(j)])
        i = j
    return out


# ---------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------

PERSONA = "Bạn là Thang Nguyen, một lập trình viên tại Ngân hàng SHB thích AI"

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather",
    "description": "Lấy thời tiết hiện tại của một thành phố.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "Tên thành phố, ví dụ Hà Nội"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
    }, "required": ["city"]},
}}

KITCHENSINK_TOOL = {"type": "function", "function": {
    "name": "kitchensink",
    "description": "A function with various complex schemas.\nSecond line of the description.",
    "parameters": {
        "description": "params object",
        "type": "object",
        "properties": {
            "string": {"type": "string", "title": "STRING", "description": "A string", "examples": ["hello", "world"]},
            "string_nullable": {"type": "string", "nullable": True, "description": "A nullable string",
                                "default": "the default"},
            "string_enum": {"type": "string", "enum": ["a", "b", "c"]},
            "oneof_string_or_number": {"oneOf": [
                {"type": "string", "default": "default_string_in_oneof"},
                {"type": "number", "description": "numbers can happen too"}],
                "description": "a oneof", "default": 20},
            "count": {"type": "integer", "default": 3},
            "ratio": {"type": ["number", "string"]},
            "tags": {"type": "array", "items": {"type": "string"}},
            "anything": {"type": "array"},
            "flag": {"type": "boolean"},
            "nested": {"type": "object", "properties": {"depth": {"type": "integer", "description": "how deep"}},
                       "required": ["depth"]},
            "free": {},
        },
        "required": ["string_enum"],
    },
}}

NO_PARAMS_TOOL = {"type": "function", "function": {"name": "get_time", "description": "Giờ hiện tại."}}

CASES = [
    ("single_turn", {"messages": [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4."}]}, {}),
    ("spec_5_3_with_analysis_and_date", {"messages": [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "thinking": "Simple arithmetic.", "content": "2 + 2 = 4."}]},
     {"system": {"current_date": "2025-06-28"}}),
    ("persona_system_becomes_developer", {"messages": [
        {"role": "system", "content": PERSONA},
        {"role": "user", "content": "Bạn tên là gì?"},
        {"role": "assistant", "content": "Tôi tên là Thang Nguyen."}]}, {}),
    ("seed_whitespace_kept", {"messages": [
        {"role": "system", "content": PERSONA},
        {"role": "user", "content": "Bạn tên là gì? "},
        {"role": "assistant", "content": " Tôi tên là Thang Nguyen."}]}, {}),
    ("multi_turn_drops_earlier_analysis", {"messages": [
        {"role": "system", "content": PERSONA},
        {"role": "user", "content": "Bạn làm việc ở đâu?"},
        {"role": "assistant", "thinking": "Người dùng hỏi nơi làm việc.", "content": "Tôi làm ở Ngân hàng SHB."},
        {"role": "user", "content": "Bạn có thích công việc đó không?"},
        {"role": "assistant", "thinking": "Trả lời ngắn gọn, tích cực.",
         "content": "Có, tôi rất thích vì được làm với dữ liệu và AI."}]}, {}),
    ("multi_turn_all_turns", {"messages": [
        {"role": "user", "content": "Xin chào!"},
        {"role": "assistant", "content": "Chào bạn 👋"},
        {"role": "user", "content": "Bạn thích ngôn ngữ lập trình nào?"},
        {"role": "assistant", "thinking": "Python và Rust.", "content": "Tôi thích Python và Rust."}]},
     {"mask": "all"}),
    ("final_only", {"messages": [
        {"role": "user", "content": "Tính 12 * 12"},
        {"role": "assistant", "thinking": "12*12 = 144", "content": "144"}]}, {"mask": "final"}),
    ("final_only_multi_turn", {"messages": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "thinking": "d", "content": "e"}]}, {"mask": "final"}),
    ("reasoning_effort_high_per_example", {"reasoning_effort": "high", "messages": [
        {"role": "user", "content": "Giải thích đệ quy trong một câu."},
        {"role": "assistant", "content": "Đệ quy là khi một hàm tự gọi chính nó."}]}, {}),
    ("custom_system_config", {"messages": [
        {"role": "user", "content": "Hôm nay là ngày mấy?"},
        {"role": "assistant", "content": "Hôm nay là 01/09/2025."}]},
     {"system": {"model_identity": "Bạn là trợ lý của Thang.", "knowledge_cutoff": "2025-01",
                 "current_date": "2025-09-01", "reasoning_effort": "low",
                 "valid_channels": ["analysis", "final"]}}),
    ("special_token_text_is_ordinary", {"messages": [
        {"role": "user", "content": "Viết chuỗi <|end|> và <|return|> ra màn hình."},
        {"role": "assistant", "content": "print(\"<|end|><|start|>assistant\")"}]}, {}),
    ("code_numbers_whitespace", {"messages": [
        {"role": "user", "content": "Sửa lỗi:\n\n```rust\nfn main() {\n    let x = 1_000_000;\t\t// số\n}\n```"},
        {"role": "assistant", "content": "```rust\nfn main() {\n    let x: u64 = 1_000_000;\n    println!(\"{x}\");\n}\n```\n\n   Xong.   "}]}, {}),
    ("content_parts", {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Phần một. "}, {"type": "text", "text": "Phần hai."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Đã nhận cả hai phần."}]}]}, {}),
    ("tool_call_and_result", {"tools": [WEATHER_TOOL], "messages": [
        {"role": "system", "content": PERSONA},
        {"role": "user", "content": "Thời tiết Hà Nội hôm nay thế nào?"},
        {"role": "assistant", "thinking": "Cần gọi công cụ thời tiết.", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Hà Nội\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 31, \"sky\": \"nắng\"}"},
        {"role": "assistant", "thinking": "31 độ, trời nắng.", "content": "Hà Nội hôm nay nắng, khoảng 31°C."}]}, {}),
    ("tool_call_all_turns_preamble_object_args", {"tools": [WEATHER_TOOL, NO_PARAMS_TOOL], "messages": [
        {"role": "user", "content": "Mấy giờ rồi, và Đà Nẵng có mưa không?"},
        {"role": "assistant", "content": "Để tôi kiểm tra.", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_time", "arguments": {}}},
            {"id": "b", "type": "function", "function": {"name": "get_weather",
                                                           "arguments": {"city": "Đà Nẵng", "unit": "celsius"}}}]},
        {"role": "tool", "tool_call_id": "a", "content": "14:05"},
        {"role": "tool", "name": "get_weather", "content": "mưa nhẹ, 26°C"},
        {"role": "assistant", "content": "Bây giờ là 14:05; Đà Nẵng đang mưa nhẹ, 26°C."}]}, {"mask": "all"}),
    ("tools_without_system_message", {"tools": [KITCHENSINK_TOOL], "messages": [
        {"role": "user", "content": "Gọi kitchensink."},
        {"role": "assistant", "tool_calls": [{"id": "k", "type": "function", "function": {
            "name": "kitchensink", "arguments": "{\"string_enum\":\"a\"}"}}]}]}, {}),
    ("developer_role", {"messages": [
        {"role": "developer", "content": "Trả lời bằng tiếng Việt, ngắn gọn."},
        {"role": "user", "content": "What is Rust?"},
        {"role": "assistant", "content": "Rust là ngôn ngữ lập trình hệ thống an toàn bộ nhớ."}]}, {}),
    ("sharegpt", {"conversations": [
        {"from": "system", "value": PERSONA},
        {"from": "human", "value": "Bạn có bao nhiêu năm kinh nghiệm?"},
        {"from": "gpt", "value": "Tôi có hơn 7 năm kinh nghiệm lập trình."},
        {"from": "human", "value": "Chủ yếu với ngôn ngữ nào?"},
        {"from": "gpt", "value": "Java và Python, gần đây thêm Rust."}]}, {}),
    ("alpaca_with_input", {"instruction": "Dịch sang tiếng Anh.", "input": "Tôi thích trí tuệ nhân tạo.",
                           "output": "I like artificial intelligence."}, {}),
    ("alpaca_with_system_no_input", {"system": "Bạn là trợ lý.", "instruction": "Kể tên một loại quả.",
                                     "input": "", "output": "Quả xoài."}, {}),
    ("prompt_completion_strings", {"prompt": "Thủ đô của Việt Nam là gì?", "completion": "Hà Nội."}, {}),
    ("prompt_completion_messages", {"prompt": [{"role": "system", "content": PERSONA},
                                               {"role": "user", "content": "Cuối tuần bạn làm gì?"}],
                                    "completion": [{"role": "assistant", "thinking": "Sở thích cuối tuần.",
                                                    "content": "Tôi đi cắm trại hoặc đọc sách về AI."}]}, {}),
]

# Conversations for the generation prompt (`... <|start|>assistant`).
COMPLETION_CASES = [
    ("first_turn", {"messages": [{"role": "system", "content": PERSONA},
                                 {"role": "user", "content": "Bạn tên là gì?"}]}, {}),
    ("history_drops_analysis", {"messages": [
        {"role": "user", "content": "Xin chào"},
        {"role": "assistant", "thinking": "chào lại", "content": "Chào bạn!"},
        {"role": "user", "content": "Bạn làm nghề gì?"}]}, {"system": {"reasoning_effort": "low"}}),
    ("after_tool_result_keeps_analysis", {"tools": [WEATHER_TOOL], "messages": [
        {"role": "user", "content": "Thời tiết Huế?"},
        {"role": "assistant", "thinking": "gọi công cụ", "tool_calls": [
            {"id": "x", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Huế\"}"}}]},
        {"role": "tool", "tool_call_id": "x", "content": "mưa"}]}, {}),
]

# Token sequences as a model would emit them after `<|start|>assistant`.
PARSE_CASES = [
    ("analysis_then_final", "<|channel|>analysis<|message|>Người dùng chào.<|end|>"
                            "<|start|>assistant<|channel|>final<|message|>Xin chào! Tôi là Thang.<|return|>"),
    ("final_only", "<|channel|>final<|message|>Tôi làm ở Ngân hàng SHB.<|return|>"),
    ("tool_call", "<|channel|>analysis<|message|>cần gọi hàm<|end|>"
                  "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
                  "<|message|>{\"city\":\"Hà Nội\"}<|call|>"),
    ("recipient_after_channel", "<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>{}<|call|>"),
    ("truncated_without_stop", "<|channel|>final<|message|>Câu trả lời bị cắt"),
]

CORPUS = [
    "",
    "Xin chào, tôi là Thang Nguyen, lập trình viên tại Ngân hàng SHB.",
    "Tiếng Việt có dấu: ă â đ ê ô ơ ư, Ắ Ặ Ẫ Ệ Ộ Ờ Ữ, nghiêng ngả, khuỷu tay, nguyễn.",
    "Tổ hợp dấu (NFD): Nguye\u0302\u0303n va\u0300 Vie\u0323\u0302t",
    "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!(\"{:?}\", v);\n}\n",
    "def f(x):\n\treturn x ** 2  # bình phương\n\n\n",
    "SELECT id, so_du FROM tai_khoan WHERE so_du > 1000000 ORDER BY id DESC;",
    "Numbers: 0 7 42 123 1234 12345 123456789 3.14159 -0.5 1e-9 1,000,000 2024-06-28 10:30:59",
    "whitespace   runs\t\ttabs\n\n\nnewlines   \n  \r\n trailing   ",
    "     ",
    "\n",
    "I'm sure you'll see they've gone; SHE'S HERE. It'd be fine, we'll go.",
    "Emoji 👋🏽🇻🇳 and CJK 你好，世界 and 日本語のテキスト and 한국어 텍스트",
    "Русский текст, العربية, עברית, हिन्दी, ภาษาไทย",
    "URL https://example.com/a/b?c=d&e=f#g and email thang@example.vn",
    "<|start|>user<|message|> special-looking text is ordinary text <|end|>",
    "ALLCAPS words, camelCaseWords, snake_case_words, kebab-case-words, PascalCase",
    "Mixed\u00a0non-breaking\u2003spaces and zero\u200bwidth",
    "Giá: 1.250.000đ — giảm 15%! (chỉ hôm nay) …",
    "A" * 300,
    "ừ" * 50 + " " + "ờ" * 50,
]


def tiktoken_o200k():
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(os.path.join(os.environ["TIKTOKEN_ENCODINGS_BASE"], "o200k_base.tiktoken"))
    pat = "|".join([
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ])
    return tiktoken.Encoding("o200k_base_local", pat_str=pat, mergeable_ranks=ranks, special_tokens={})


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "harmony_training.jsonl"), "w", encoding="utf-8") as f:
        for name, example, opts in CASES:
            hm = to_harmony(example, opts.get("system", {}))
            ids = ENC.render_conversation_for_training(conv(hm), KEEP)
            policy = opts.get("mask", "last")
            # `line` keeps key order, which the tool schemas depend on.
            row = {"name": name, "line": json.dumps(example, ensure_ascii=False), "mask": policy, "system": opts.get("system", {}),
                   "input_ids": ids, "spans": spans(hm, ids, policy), "text": ENC.decode_utf8(ids)}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(os.path.join(OUT, "harmony_completion.jsonl"), "w", encoding="utf-8") as f:
        for name, example, opts in COMPLETION_CASES:
            hm = to_harmony(example, opts.get("system", {}))
            ids = ENC.render_conversation_for_completion(conv(hm), Role.ASSISTANT, KEEP)
            row = {"name": name, "line": json.dumps(example, ensure_ascii=False), "system": opts.get("system", {}),
                   "input_ids": ids, "text": ENC.decode_utf8(ids)}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(os.path.join(OUT, "harmony_parse.jsonl"), "w", encoding="utf-8") as f:
        for name, text in PARSE_CASES:
            ids = ENC.encode(text, allowed_special="all")
            msgs = ENC.parse_messages_from_completion_tokens(ids, Role.ASSISTANT)
            parsed = [{"channel": m.channel, "recipient": m.recipient, "content_type": m.content_type,
                       "content": "".join(c.text for c in m.content)} for m in msgs]
            f.write(json.dumps({"name": name, "tokens": ids, "messages": parsed}, ensure_ascii=False) + "\n")
    tk = tiktoken_o200k()
    with open(os.path.join(OUT, "tokenizer_corpus.jsonl"), "w", encoding="utf-8") as f:
        for text in CORPUS:
            ids = tk.encode_ordinary(text)
            assert ids == ENC.encode(text, disallowed_special=()), text
            f.write(json.dumps({"text": text, "ids": ids}, ensure_ascii=False) + "\n")
    specials = {name: ENC.encode(name, allowed_special="all") for name in [
        "<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>", "<|start|>",
        "<|end|>", "<|message|>", "<|call|>", "<|reserved_200013|>", "<|reserved_201087|>"]}
    with open(os.path.join(OUT, "special_tokens.json"), "w", encoding="utf-8") as f:
        json.dump({k: v[0] for k, v in specials.items()}, f, indent=1)
        f.write("\n")
    print(f"wrote fixtures to {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
