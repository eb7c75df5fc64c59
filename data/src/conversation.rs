//! Conversations, and their parsing from the four JSONL formats.
//!
//! Every format maps to the same [`Conversation`]; the mapping is the contract
//! that `scripts/data_fixtures.py` writes out independently:
//! * OpenAI `messages`: roles system, developer, user, assistant, tool; an
//!   assistant's `thinking` is its analysis channel; `tool_calls` as in the
//!   OpenAI API (`arguments` a JSON string or object); top-level `tools`.
//! * ShareGPT `conversations` with `from` (system, human/user, gpt/assistant)
//!   and `value`.
//! * Alpaca `instruction`, optional `input` (appended after a blank line),
//!   `output`, optional `system`.
//! * `prompt`/`completion`, each a string or a list of messages.
//!
//! Any example may set `reasoning_effort` (low, medium, high). Other top-level
//! keys (ids, sources, metadata) are ignored; unknown keys inside a message are
//! errors, since a misspelt `content` would otherwise lose the text silently.

use crate::error::{Diagnostic, Location, Reason};
use crate::json::{Kind, Member, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::Developer => "developer",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReasoningEffort {
    Low,
    Medium,
    High,
}

impl ReasoningEffort {
    pub fn as_str(self) -> &'static str {
        match self {
            ReasoningEffort::Low => "low",
            ReasoningEffort::Medium => "medium",
            ReasoningEffort::High => "high",
        }
    }

    pub fn parse(s: &str) -> Option<ReasoningEffort> {
        match s {
            "low" => Some(ReasoningEffort::Low),
            "medium" => Some(ReasoningEffort::Medium),
            "high" => Some(ReasoningEffort::High),
            _ => None,
        }
    }
}

/// A function call made by the assistant.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: Option<String>,
    pub name: String,
    /// The arguments as JSON text, rendered verbatim.
    pub arguments: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// Assistant chain of thought, rendered on the `analysis` channel.
    pub thinking: Option<String>,
    pub tool_calls: Vec<ToolCall>,
    /// For tool results: the function that produced it (else found through
    /// `tool_call_id`).
    pub name: Option<String>,
    pub tool_call_id: Option<String>,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Message {
        Message {
            role,
            content: content.into(),
            thinking: None,
            tool_calls: Vec::new(),
            name: None,
            tool_call_id: None,
        }
    }

    pub fn system(content: impl Into<String>) -> Message {
        Message::new(Role::System, content)
    }

    pub fn user(content: impl Into<String>) -> Message {
        Message::new(Role::User, content)
    }

    pub fn assistant(content: impl Into<String>) -> Message {
        Message::new(Role::Assistant, content)
    }

    pub fn with_thinking(mut self, thinking: impl Into<String>) -> Message {
        self.thinking = Some(thinking.into());
        self
    }
}

/// A function the assistant may call, as declared in the example's `tools`.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    pub(crate) parameters: Option<Value>,
}

impl ToolSpec {
    /// `parameters` is a JSON schema as text; key order is kept, as harmony
    /// renders properties in the order given.
    pub fn new(
        name: impl Into<String>,
        description: impl Into<String>,
        parameters: Option<&str>,
    ) -> crate::Result<ToolSpec> {
        let parameters = parameters
            .map(|p| {
                crate::json::parse_line(p).map_err(|e| {
                    crate::Error::Conversation(format!(
                        "tool parameters are not valid JSON at byte {}: {}",
                        e.pos, e.message
                    ))
                })
            })
            .transpose()?;
        Ok(ToolSpec { name: name.into(), description: description.into(), parameters })
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Conversation {
    pub messages: Vec<Message>,
    pub tools: Vec<ToolSpec>,
    /// Overrides the system message's reasoning effort for this example.
    pub reasoning_effort: Option<ReasoningEffort>,
}

impl Conversation {
    pub fn new(messages: Vec<Message>) -> Conversation {
        Conversation { messages, ..Conversation::default() }
    }

    /// Parses one conversation written as a JSONL line would be, in any of
    /// the four formats (for chat front ends and tests). How it ends is
    /// checked only when it is rendered.
    pub fn from_json(text: &str) -> crate::Result<Conversation> {
        let ctx = LineCtx { file: "<conversation>", line_no: 1, line: text };
        let value = crate::json::parse_line(text).map_err(|e| {
            crate::Error::Invalid(ctx.at(e.pos, Reason::MalformedJson, format!("malformed JSON: {}", e.message)))
        })?;
        let format = Format::detect(&value).ok_or_else(|| {
            crate::Error::Invalid(ctx.at(
                value.pos,
                Reason::UnknownFormat,
                "expected \"messages\", \"conversations\", \"instruction\"/\"output\" or \"prompt\"/\"completion\"",
            ))
        })?;
        parse_example(&ctx, &value, format, false).map_err(crate::Error::Invalid)
    }
}

/// The JSONL dialect of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Messages,
    ShareGpt,
    Alpaca,
    PromptCompletion,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Messages => "OpenAI messages",
            Format::ShareGpt => "ShareGPT",
            Format::Alpaca => "Alpaca",
            Format::PromptCompletion => "prompt/completion",
        }
    }

    /// The format an example object is written in, from its keys.
    pub(crate) fn detect(obj: &Value) -> Option<Format> {
        let has = |k| obj.get(k).is_some();
        if has("messages") {
            Some(Format::Messages)
        } else if has("conversations") {
            Some(Format::ShareGpt)
        } else if has("instruction") || (has("output") && !has("completion")) {
            Some(Format::Alpaca)
        } else if has("prompt") || has("completion") {
            Some(Format::PromptCompletion)
        } else {
            None
        }
    }
}

/// Turns byte offsets of one line into diagnostics.
pub(crate) struct LineCtx<'a> {
    pub file: &'a str,
    pub line_no: usize,
    pub line: &'a str,
}

impl LineCtx<'_> {
    pub fn at(&self, pos: usize, reason: Reason, message: impl Into<String>) -> Diagnostic {
        let pos = pos.min(self.line.len());
        let column = self.line.get(..pos).map_or(pos, |s| s.chars().count()) + 1;
        Diagnostic {
            location: Location { file: self.file.to_string(), line: self.line_no, column },
            reason,
            message: message.into(),
        }
    }
}

type Parsed<T> = Result<T, Diagnostic>;

/// Parses one example object in the given format; with `for_training`, also
/// checks that it ends with an answer to train on.
pub(crate) fn parse_example(ctx: &LineCtx, obj: &Value, format: Format, for_training: bool) -> Parsed<Conversation> {
    if !matches!(obj.kind, Kind::Object(_)) {
        return Err(ctx.at(
            obj.pos,
            Reason::UnknownFormat,
            format!("expected a JSON object per line, found {}", obj.type_name()),
        ));
    }
    let (messages, positions) = match format {
        Format::Messages => {
            let list = obj.get("messages").ok_or_else(|| missing(ctx, obj, "messages"))?;
            parse_message_list(ctx, list, "messages")?
        }
        Format::ShareGpt => parse_sharegpt(ctx, obj)?,
        Format::Alpaca => parse_alpaca(ctx, obj)?,
        Format::PromptCompletion => parse_prompt_completion(ctx, obj)?,
    };
    let tools = match obj.get("tools") {
        None => Vec::new(),
        Some(v) => parse_tools(ctx, v)?,
    };
    let reasoning_effort = match obj.get("reasoning_effort") {
        None => None,
        Some(v) => Some(parse_effort(ctx, v)?),
    };
    let end = for_training.then_some(true);
    if let Some((idx, reason, msg)) = structure_problem(&messages, end) {
        let pos = positions.get(idx).copied().unwrap_or(obj.pos);
        return Err(ctx.at(pos, reason, msg));
    }
    Ok(Conversation { messages, tools, reasoning_effort })
}

fn missing(ctx: &LineCtx, obj: &Value, key: &str) -> Diagnostic {
    ctx.at(obj.pos, Reason::InvalidField, format!("missing required key \"{key}\""))
}

fn expect_string<'v>(ctx: &LineCtx, v: &'v Value, what: &str) -> Parsed<&'v str> {
    v.as_str().ok_or_else(|| {
        ctx.at(v.pos, Reason::InvalidField, format!("expected {what} to be a string, found {}", v.type_name()))
    })
}

fn parse_effort(ctx: &LineCtx, v: &Value) -> Parsed<ReasoningEffort> {
    let s = expect_string(ctx, v, "reasoning_effort")?;
    ReasoningEffort::parse(s).ok_or_else(|| {
        ctx.at(
            v.pos,
            Reason::InvalidField,
            format!(
                "unknown reasoning_effort \"{s}\"{}; expected low, medium or high",
                suggestion(s, &["low", "medium", "high"])
            ),
        )
    })
}

/// `; did you mean "x"?` for a near miss, else nothing.
pub(crate) fn suggestion(got: &str, valid: &[&str]) -> String {
    let norm: String = got.trim().trim_matches(|c: char| !c.is_alphanumeric()).to_lowercase();
    let best = valid.iter().map(|v| (edit_distance(&norm, v), *v)).min_by_key(|&(d, _)| d);
    match best {
        Some((d, v)) if d <= 2 && d < v.len() => format!("; did you mean \"{v}\"?"),
        _ => String::new(),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn members<'v>(ctx: &LineCtx, v: &'v Value, what: &str) -> Parsed<&'v [Member]> {
    match &v.kind {
        Kind::Object(m) => Ok(m),
        _ => Err(ctx.at(
            v.pos,
            Reason::InvalidField,
            format!("expected {what} to be an object, found {}", v.type_name()),
        )),
    }
}

fn items<'v>(ctx: &LineCtx, v: &'v Value, what: &str) -> Parsed<&'v [Value]> {
    match &v.kind {
        Kind::Array(items) => Ok(items),
        _ => {
            Err(ctx.at(v.pos, Reason::InvalidField, format!("expected {what} to be an array, found {}", v.type_name())))
        }
    }
}

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];
const MESSAGE_KEYS: [&str; 6] = ["role", "content", "thinking", "tool_calls", "tool_call_id", "name"];

fn parse_message_list(ctx: &LineCtx, list: &Value, what: &str) -> Parsed<(Vec<Message>, Vec<usize>)> {
    let mut messages = Vec::new();
    let mut positions = Vec::new();
    for item in items(ctx, list, what)? {
        messages.push(parse_message(ctx, item)?);
        positions.push(item.pos);
    }
    Ok((messages, positions))
}

fn parse_message(ctx: &LineCtx, v: &Value) -> Parsed<Message> {
    let fields = members(ctx, v, "each message")?;
    for m in fields {
        if !MESSAGE_KEYS.contains(&m.key.as_str()) {
            return Err(ctx.at(
                m.key_pos,
                Reason::InvalidField,
                format!(
                    "unknown message field \"{}\"{}; a message has {}",
                    m.key,
                    suggestion(&m.key, &MESSAGE_KEYS),
                    MESSAGE_KEYS.join(", ")
                ),
            ));
        }
    }
    let role_v = v.get("role").ok_or_else(|| missing(ctx, v, "role"))?;
    let role_s = expect_string(ctx, role_v, "role")?;
    let role = match role_s {
        "system" => Role::System,
        "developer" => Role::Developer,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        "tool" => Role::Tool,
        other => {
            return Err(ctx.at(
                role_v.pos,
                Reason::UnknownRole,
                format!("unknown role \"{other}\"{}; valid roles are {}", suggestion(other, &ROLES), ROLES.join(", ")),
            ))
        }
    };
    let content = match v.get("content") {
        None => String::new(),
        Some(c) => parse_content(ctx, c)?,
    };
    let thinking = match v.get("thinking") {
        Some(t) if role == Role::Assistant => Some(expect_string(ctx, t, "thinking")?.to_string()),
        Some(t) => return Err(ctx.at(t.pos, Reason::InvalidField, "only assistant messages have \"thinking\"")),
        None => None,
    };
    let tool_calls = match v.get("tool_calls") {
        Some(t) if role == Role::Assistant => parse_tool_calls(ctx, t)?,
        Some(t) => return Err(ctx.at(t.pos, Reason::InvalidField, "only assistant messages have \"tool_calls\"")),
        None => Vec::new(),
    };
    let opt_string = |key: &str| -> Parsed<Option<String>> {
        match v.get(key) {
            Some(x) if role == Role::Tool => Ok(Some(expect_string(ctx, x, key)?.to_string())),
            Some(x) => Err(ctx.at(x.pos, Reason::InvalidField, format!("only tool messages have \"{key}\""))),
            None => Ok(None),
        }
    };
    let name = opt_string("name")?;
    if let (Some(n), Some(v)) = (&name, v.get("name")) {
        check_function_name(ctx, v, n)?;
    }
    let tool_call_id = opt_string("tool_call_id")?;
    let msg = Message { role, content, thinking, tool_calls, name, tool_call_id };
    if msg.content.trim().is_empty() && msg.tool_calls.is_empty() {
        let pos = v.get("content").map_or(v.pos, |c| c.pos);
        let what = if v.get("content").is_none() { "has no \"content\"" } else { "has empty content" };
        return Err(ctx.at(
            pos,
            Reason::EmptyContent,
            format!("{} message {what}; write the text or remove the message", role.as_str()),
        ));
    }
    if msg.thinking.as_deref().is_some_and(|t| t.trim().is_empty()) {
        let pos = v.get("thinking").map_or(v.pos, |t| t.pos);
        return Err(ctx.at(pos, Reason::EmptyContent, "\"thinking\" is empty; write the reasoning or remove the key"));
    }
    Ok(msg)
}

/// A string, or OpenAI's list of `{"type": "text", "text": ...}` parts (joined).
fn parse_content(ctx: &LineCtx, c: &Value) -> Parsed<String> {
    match &c.kind {
        Kind::String(s) => Ok(s.clone()),
        Kind::Null => Ok(String::new()),
        Kind::Array(parts) => {
            let mut out = String::new();
            for p in parts {
                let ty = p.get("type").and_then(Value::as_str);
                match (ty, p.get("text").and_then(Value::as_str)) {
                    (Some("text") | None, Some(t)) => out.push_str(t),
                    (Some(other), _) => {
                        return Err(ctx.at(
                            p.pos,
                            Reason::InvalidField,
                            format!("content part of type \"{other}\" is not supported; only text parts are"),
                        ))
                    }
                    (None, None) => {
                        return Err(ctx.at(
                            p.pos,
                            Reason::InvalidField,
                            "expected a content part {\"type\": \"text\", \"text\": \"...\"}",
                        ))
                    }
                }
            }
            Ok(out)
        }
        _ => Err(ctx.at(
            c.pos,
            Reason::InvalidField,
            format!("expected content to be a string or a list of text parts, found {}", c.type_name()),
        )),
    }
}

fn parse_tool_calls(ctx: &LineCtx, v: &Value) -> Parsed<Vec<ToolCall>> {
    let mut calls = Vec::new();
    for call in items(ctx, v, "tool_calls")? {
        members(ctx, call, "each tool call")?;
        let f = call.get("function").ok_or_else(|| missing(ctx, call, "function"))?;
        members(ctx, f, "\"function\"")?;
        let name_v = f.get("name").ok_or_else(|| missing(ctx, f, "name"))?;
        let name = expect_string(ctx, name_v, "the function name")?;
        check_function_name(ctx, name_v, name)?;
        let args_v = f.get("arguments").ok_or_else(|| missing(ctx, f, "arguments"))?;
        let arguments = match &args_v.kind {
            Kind::String(s) => {
                if let Err(e) = crate::json::parse_line(s) {
                    return Err(ctx.at(
                        args_v.pos,
                        Reason::InvalidField,
                        format!(
                            "tool call arguments are not valid JSON ({} at character {} of the arguments)",
                            e.message,
                            s.get(..e.pos).map_or(e.pos, |p| p.chars().count()) + 1
                        ),
                    ));
                }
                s.clone()
            }
            Kind::Object(_) => args_v.to_compact(),
            _ => {
                return Err(ctx.at(
                    args_v.pos,
                    Reason::InvalidField,
                    format!(
                        "expected arguments to be a JSON object or a string holding one, found {}",
                        args_v.type_name()
                    ),
                ))
            }
        };
        let id = match call.get("id") {
            Some(i) => Some(expect_string(ctx, i, "the tool call id")?.to_string()),
            None => None,
        };
        calls.push(ToolCall { id, name: name.to_string(), arguments });
    }
    Ok(calls)
}

/// Harmony headers are split on whitespace; a name with spaces would change
/// the header's meaning.
fn check_function_name(ctx: &LineCtx, v: &Value, name: &str) -> Parsed<()> {
    if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == '<') {
        return Err(ctx.at(
            v.pos,
            Reason::InvalidField,
            format!("function name \"{name}\" must be non-empty without spaces or `<`"),
        ));
    }
    Ok(())
}

fn parse_tools(ctx: &LineCtx, v: &Value) -> Parsed<Vec<ToolSpec>> {
    let mut tools = Vec::new();
    for t in items(ctx, v, "tools")? {
        members(ctx, t, "each tool")?;
        if let Some(ty) = t.get("type") {
            if ty.as_str() != Some("function") {
                return Err(ctx.at(ty.pos, Reason::InvalidField, "only tools of \"type\": \"function\" are supported"));
            }
        }
        let f = t.get("function").ok_or_else(|| missing(ctx, t, "function"))?;
        members(ctx, f, "\"function\"")?;
        let name_v = f.get("name").ok_or_else(|| missing(ctx, f, "name"))?;
        let name = expect_string(ctx, name_v, "the tool name")?;
        check_function_name(ctx, name_v, name)?;
        let description = match f.get("description") {
            Some(d) => expect_string(ctx, d, "the tool description")?.to_string(),
            None => String::new(),
        };
        let parameters = match f.get("parameters") {
            Some(p) => {
                members(ctx, p, "\"parameters\" (a JSON schema)")?;
                Some(p.clone())
            }
            None => None,
        };
        tools.push(ToolSpec { name: name.to_string(), description, parameters });
    }
    Ok(tools)
}

const SHAREGPT_FROM: [&str; 5] = ["system", "human", "user", "gpt", "assistant"];

fn parse_sharegpt(ctx: &LineCtx, obj: &Value) -> Parsed<(Vec<Message>, Vec<usize>)> {
    let list = obj.get("conversations").ok_or_else(|| missing(ctx, obj, "conversations"))?;
    let mut messages = Vec::new();
    let mut positions = Vec::new();
    for turn in items(ctx, list, "conversations")? {
        members(ctx, turn, "each turn")?;
        let from_v = turn.get("from").ok_or_else(|| missing(ctx, turn, "from"))?;
        let from = expect_string(ctx, from_v, "\"from\"")?;
        let role = match from {
            "system" => Role::System,
            "human" | "user" => Role::User,
            "gpt" | "assistant" => Role::Assistant,
            other => {
                return Err(ctx.at(
                    from_v.pos,
                    Reason::UnknownRole,
                    format!(
                        "unknown ShareGPT speaker \"{other}\"{}; valid ones are {}",
                        suggestion(other, &SHAREGPT_FROM),
                        SHAREGPT_FROM.join(", ")
                    ),
                ))
            }
        };
        let value_v = turn.get("value").ok_or_else(|| missing(ctx, turn, "value"))?;
        let value = expect_string(ctx, value_v, "\"value\"")?;
        if value.trim().is_empty() {
            return Err(ctx.at(
                value_v.pos,
                Reason::EmptyContent,
                format!("\"{from}\" turn has empty \"value\"; write the text or remove the turn"),
            ));
        }
        messages.push(Message::new(role, value));
        positions.push(turn.pos);
    }
    Ok((messages, positions))
}

fn parse_alpaca(ctx: &LineCtx, obj: &Value) -> Parsed<(Vec<Message>, Vec<usize>)> {
    let field = |key: &str, required: bool| -> Parsed<Option<(&str, usize)>> {
        match obj.get(key) {
            Some(v) => {
                let s = expect_string(ctx, v, &format!("\"{key}\""))?;
                if required && s.trim().is_empty() {
                    return Err(ctx.at(v.pos, Reason::EmptyContent, format!("\"{key}\" is empty; write the text")));
                }
                Ok(Some((s, v.pos)))
            }
            None if required => Err(missing(ctx, obj, key)),
            None => Ok(None),
        }
    };
    let (instruction, ipos) = field("instruction", true)?.unwrap_or_default();
    let (output, opos) = field("output", true)?.unwrap_or_default();
    let input = field("input", false)?;
    let system = field("system", false)?;
    let mut messages = Vec::new();
    let mut positions = Vec::new();
    if let Some((s, pos)) = system.filter(|(s, _)| !s.trim().is_empty()) {
        messages.push(Message::system(s));
        positions.push(pos);
    }
    let user = match input.filter(|(s, _)| !s.trim().is_empty()) {
        Some((inp, _)) => format!("{instruction}\n\n{inp}"),
        None => instruction.to_string(),
    };
    messages.push(Message::user(user));
    positions.push(ipos);
    messages.push(Message::assistant(output));
    positions.push(opos);
    Ok((messages, positions))
}

fn parse_prompt_completion(ctx: &LineCtx, obj: &Value) -> Parsed<(Vec<Message>, Vec<usize>)> {
    let side = |key: &str, role: Role| -> Parsed<(Vec<Message>, Vec<usize>)> {
        let v = obj.get(key).ok_or_else(|| missing(ctx, obj, key))?;
        match &v.kind {
            Kind::String(s) if s.trim().is_empty() => {
                Err(ctx.at(v.pos, Reason::EmptyContent, format!("\"{key}\" is empty; write the text")))
            }
            Kind::String(s) => Ok((vec![Message::new(role, s.as_str())], vec![v.pos])),
            _ => parse_message_list(ctx, v, &format!("\"{key}\" (a string or a list of messages)")),
        }
    };
    let (mut messages, mut positions) = side("prompt", Role::User)?;
    let (completion, cpos) = side("completion", Role::Assistant)?;
    if let Some((i, m)) = completion.iter().enumerate().find(|(_, m)| m.role != Role::Assistant && m.role != Role::Tool)
    {
        return Err(ctx.at(
            cpos[i],
            Reason::MisplacedMessage,
            format!("\"completion\" holds a {} message; put it in \"prompt\"", m.role.as_str()),
        ));
    }
    messages.extend(completion);
    positions.extend(cpos);
    Ok((messages, positions))
}

/// The first structural problem of a message list: index, reason, message.
///
/// `end` also checks how the conversation ends: for training
/// (`Some(true)`) with the assistant's answer, for a generation prompt
/// (`Some(false)`) with a user or tool message.
pub(crate) fn structure_problem(messages: &[Message], end: Option<bool>) -> Option<(usize, Reason, String)> {
    let mut calls: Vec<&str> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        match m.role {
            Role::System | Role::Developer if i > 0 => {
                return Some((
                    i,
                    Reason::MisplacedMessage,
                    format!("a {} message may only be the first message; merge it into the first one", m.role.as_str()),
                ))
            }
            Role::Tool => {
                let known = match (&m.name, &m.tool_call_id) {
                    (Some(_), _) => true,
                    (None, Some(id)) => calls.contains(&id.as_str()),
                    (None, None) => false,
                };
                if !known {
                    return Some((
                        i,
                        Reason::InvalidField,
                        "tool message needs \"name\" or a \"tool_call_id\" of an earlier assistant tool call"
                            .to_string(),
                    ));
                }
            }
            Role::Assistant => calls.extend(m.tool_calls.iter().filter_map(|c| c.id.as_deref())),
            _ => {}
        }
    }
    let Some(last) = messages.len().checked_sub(1) else {
        return Some((0, Reason::NoAssistantTurn, "the conversation has no messages".to_string()));
    };
    let last_role = messages[last].role;
    match end {
        Some(true) if !messages.iter().any(|m| m.role == Role::Assistant) => Some((
            0,
            Reason::NoAssistantTurn,
            "no assistant message; add the answer the model should learn".to_string(),
        )),
        Some(true) if last_role != Role::Assistant => Some((
            last,
            Reason::NoAssistantTurn,
            format!(
                "the last message is a {} message; a training example must end with the assistant's answer",
                last_role.as_str()
            ),
        )),
        Some(false) if !matches!(last_role, Role::User | Role::Tool) => Some((
            last,
            Reason::MisplacedMessage,
            format!("a generation prompt must end with a user or tool message, not a {} one", last_role.as_str()),
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_the_nearest_role() {
        assert_eq!(suggestion("system,", &ROLES), "; did you mean \"system\"?");
        assert_eq!(suggestion("User", &ROLES), "; did you mean \"user\"?");
        assert_eq!(suggestion("asistant", &ROLES), "; did you mean \"assistant\"?");
        assert_eq!(suggestion("narrator", &ROLES), "");
    }

    #[test]
    fn edit_distance_counts_unicode_characters() {
        assert_eq!(edit_distance("ừ", "ư"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
