//! The harmony chat format of GPT-OSS (spec gptoss.md §5): conversations to
//! token ids with loss spans, generation prompts, and parsing of what the
//! model generates.
//!
//! The token ids equal those of OpenAI's reference renderer `openai-harmony`
//! (`render_conversation_for_training` / `_for_completion` with
//! `auto_drop_analysis=False`, after the mapping below); the fixtures in
//! `fixtures/data/harmony_*.jsonl` check this.
//!
//! Mapping of a [`Conversation`] to harmony messages:
//! * a system message built from [`SystemConfig`] (harmony's defaults), with
//!   the example's `reasoning_effort` if it sets one;
//! * a leading system or developer message becomes the developer message
//!   `# Instructions\n\n{content}`, followed by `# Tools` when the example
//!   declares tools. The gpt-oss chat template writes one more blank line
//!   before `<|end|>`; harmony does not, and we follow harmony;
//! * an assistant message becomes [analysis], then its content on `final`
//!   (or on `commentary`, as a preamble, when it also calls tools), then one
//!   `commentary` message per call to `functions.NAME` with content type
//!   `<|constrain|>json`, ending in `<|call|>`;
//! * a tool result becomes `functions.NAME to=assistant` on `commentary`;
//! * analysis is kept only after the last user message: earlier turns drop
//!   their chain of thought, as they do at inference time.
//!
//! A training rendering ends in `<|return|>` when its last message is a final
//! answer.

mod schema;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use crate::conversation::{structure_problem, Conversation, ReasoningEffort, Role};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// Content of the harmony system message. Defaults are harmony's.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SystemConfig {
    pub model_identity: Option<String>,
    pub knowledge_cutoff: Option<String>,
    /// `Current date: …` line; harmony writes none by default.
    pub current_date: Option<String>,
    pub reasoning_effort: Option<ReasoningEffort>,
    pub valid_channels: Vec<String>,
    pub channel_required: bool,
}

impl Default for SystemConfig {
    fn default() -> Self {
        SystemConfig {
            model_identity: Some("You are ChatGPT, a large language model trained by OpenAI.".to_string()),
            knowledge_cutoff: Some("2024-06".to_string()),
            current_date: None,
            reasoning_effort: Some(ReasoningEffort::Medium),
            valid_channels: ["analysis", "commentary", "final"].map(String::from).to_vec(),
            channel_required: true,
        }
    }
}

impl SystemConfig {
    /// The system message text, as harmony's `Render<SystemContent>` writes it.
    pub fn render_text(&self, effort: Option<ReasoningEffort>, has_function_tools: bool) -> String {
        let mut sections = Vec::new();
        let top: Vec<String> = [
            self.model_identity.clone(),
            self.knowledge_cutoff.as_ref().map(|k| format!("Knowledge cutoff: {k}")),
            self.current_date.as_ref().map(|d| format!("Current date: {d}")),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !top.is_empty() {
            sections.push(top.join("\n"));
        }
        if let Some(e) = effort.or(self.reasoning_effort) {
            sections.push(format!("Reasoning: {}", e.as_str()));
        }
        if !self.valid_channels.is_empty() {
            let mut channels = format!("# Valid channels: {}.", self.valid_channels.join(", "));
            if self.channel_required {
                channels.push_str(" Channel must be included for every message.");
            }
            if has_function_tools {
                channels.push_str("\nCalls to these tools must go to the commentary channel: 'functions'.");
            }
            sections.push(channels);
        }
        sections.join("\n\n")
    }
}

/// Which tokens carry loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskPolicy {
    /// What the model generates in the last assistant turn (after the last
    /// user message): from the token after `<|start|>assistant` through
    /// `<|return|>` or `<|call|>`, analysis and the `<|end|><|start|>assistant`
    /// between its messages included; tool results excluded.
    #[default]
    LastTurn,
    /// The same for every assistant turn. Earlier turns end in `<|end|>` and,
    /// having dropped their analysis, train only the answer.
    AllTurns,
    /// Only the final-channel messages of the last turn, from `<|channel|>`
    /// through `<|return|>`.
    FinalOnly,
}

/// A conversation rendered for training.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub input_ids: Vec<u32>,
    /// Token ranges that carry loss, sorted and disjoint.
    pub trained: Vec<Range<usize>>,
}

/// Label of a position that carries no loss (PyTorch's `ignore_index`).
pub const IGNORE: i32 = -100;

impl Rendered {
    /// Per-token targets as transformers expects them (unshifted): the token
    /// id where loss is taken, -100 elsewhere.
    pub fn labels(&self) -> Vec<i32> {
        let mut labels = vec![IGNORE; self.input_ids.len()];
        for r in &self.trained {
            for i in r.clone() {
                labels[i] = self.input_ids[i] as i32;
            }
        }
        labels
    }

    pub fn trainable_tokens(&self) -> usize {
        self.trained.iter().map(|r| r.len()).sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// Not generated by the model: system, developer, user, tool results.
    Prompt,
    /// Generated by the model, not on the final channel.
    Assistant,
    Final,
}

struct HarmonyMessage {
    author: String,
    recipient: Option<String>,
    channel: Option<&'static str>,
    constrain_json: bool,
    content: String,
    part: Part,
}

impl HarmonyMessage {
    fn new(author: &str, content: String, part: Part) -> HarmonyMessage {
        HarmonyMessage {
            author: author.to_string(),
            recipient: None,
            channel: None,
            constrain_json: false,
            content,
            part,
        }
    }

    fn on(mut self, channel: &'static str) -> HarmonyMessage {
        self.channel = Some(channel);
        self
    }
}

/// Renders conversations with one tokenizer and system configuration.
///
/// Cheap to clone; clones share the cache of system and developer message
/// tokens, which are the same for most examples of a dataset and make up
/// about half of a short example's tokens.
#[derive(Debug, Clone)]
pub struct Renderer {
    tokenizer: Tokenizer,
    system: SystemConfig,
    header_cache: Arc<Mutex<HashMap<String, Arc<[u32]>>>>,
}

/// Distinct system/developer texts remembered; a dataset with a different
/// instruction per example stops filling the cache here.
const HEADER_CACHE_ENTRIES: usize = 256;

impl Renderer {
    pub fn new(tokenizer: Tokenizer, system: SystemConfig) -> Renderer {
        Renderer { tokenizer, system, header_cache: Arc::default() }
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn system(&self) -> &SystemConfig {
        &self.system
    }

    fn harmony_messages(&self, conv: &Conversation) -> Result<Vec<HarmonyMessage>> {
        let msgs = &conv.messages;
        let mut out = vec![HarmonyMessage::new(
            "system",
            self.system.render_text(conv.reasoning_effort, !conv.tools.is_empty()),
            Part::Prompt,
        )];
        let (instructions, rest) = match msgs.first() {
            Some(m) if matches!(m.role, Role::System | Role::Developer) => (Some(m.content.as_str()), &msgs[1..]),
            _ => (None, &msgs[..]),
        };
        let mut developer = Vec::new();
        if let Some(i) = instructions {
            developer.push(format!("# Instructions\n\n{i}"));
        }
        if !conv.tools.is_empty() {
            developer.push(schema::tools_section(&conv.tools));
        }
        if !developer.is_empty() {
            out.push(HarmonyMessage::new("developer", developer.join("\n\n"), Part::Prompt));
        }
        let last_user = rest.iter().rposition(|m| m.role == Role::User);
        let mut call_names: Vec<(&str, &str)> = Vec::new();
        for (i, m) in rest.iter().enumerate() {
            match m.role {
                Role::User => out.push(HarmonyMessage::new("user", m.content.clone(), Part::Prompt)),
                Role::Assistant => {
                    let current_turn = last_user.is_none_or(|u| i > u);
                    if let (Some(t), true) = (&m.thinking, current_turn) {
                        out.push(HarmonyMessage::new("assistant", t.clone(), Part::Assistant).on("analysis"));
                    }
                    if !m.content.is_empty() {
                        out.push(if m.tool_calls.is_empty() {
                            HarmonyMessage::new("assistant", m.content.clone(), Part::Final).on("final")
                        } else {
                            HarmonyMessage::new("assistant", m.content.clone(), Part::Assistant).on("commentary")
                        });
                    }
                    for c in &m.tool_calls {
                        if let Some(id) = &c.id {
                            call_names.push((id, &c.name));
                        }
                        let mut call =
                            HarmonyMessage::new("assistant", c.arguments.clone(), Part::Assistant).on("commentary");
                        call.recipient = Some(format!("functions.{}", c.name));
                        call.constrain_json = true;
                        out.push(call);
                    }
                }
                Role::Tool => {
                    let name = match (&m.name, &m.tool_call_id) {
                        (Some(n), _) => n.as_str(),
                        (None, Some(id)) => {
                            call_names.iter().rev().find(|(cid, _)| cid == id).map(|(_, n)| *n).ok_or_else(|| {
                                Error::Conversation(format!("tool result for unknown tool_call_id \"{id}\""))
                            })?
                        }
                        (None, None) => {
                            return Err(Error::Conversation("tool message needs a name or a tool_call_id".to_string()))
                        }
                    };
                    let mut result = HarmonyMessage::new(&format!("functions.{name}"), m.content.clone(), Part::Prompt)
                        .on("commentary");
                    result.recipient = Some("assistant".to_string());
                    out.push(result);
                }
                Role::System | Role::Developer => {
                    return Err(Error::Conversation(format!(
                        "message {i}: a {} message may only be the first message",
                        m.role.as_str()
                    )))
                }
            }
        }
        Ok(out)
    }

    fn encode_into(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        if !text.is_empty() {
            out.extend(self.tokenizer.encode(text)?);
        }
        Ok(())
    }

    fn encode_cached(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        // A poisoned lock only means another thread panicked mid-insert of a
        // complete entry; the map is still valid.
        let cached = self.header_cache.lock().unwrap_or_else(|e| e.into_inner()).get(text).cloned();
        let ids = match cached {
            Some(ids) => ids,
            None => {
                let ids: Arc<[u32]> = self.tokenizer.encode(text)?.into();
                let mut cache = self.header_cache.lock().unwrap_or_else(|e| e.into_inner());
                if cache.len() < HEADER_CACHE_ENTRIES {
                    cache.insert(text.to_string(), ids.clone());
                }
                ids
            }
        };
        out.extend_from_slice(&ids);
        Ok(())
    }

    /// Renders one message; returns the index right after its role token(s),
    /// where generated tokens begin.
    fn render_message(&self, m: &HarmonyMessage, out: &mut Vec<u32>) -> Result<usize> {
        let t = self.tokenizer.harmony_tokens();
        out.push(t.start);
        self.encode_into(&m.author, out)?;
        let after_role = out.len();
        if let Some(r) = &m.recipient {
            self.encode_into(&format!(" to={r}"), out)?;
        }
        if let Some(c) = m.channel {
            out.push(t.channel);
            self.encode_into(c, out)?;
        }
        if m.constrain_json {
            self.encode_into(" ", out)?;
            out.push(t.constrain);
            self.encode_into("json", out)?;
        }
        out.push(t.message);
        if m.author == "system" || m.author == "developer" {
            self.encode_cached(&m.content, out)?;
        } else {
            self.encode_into(&m.content, out)?;
        }
        out.push(if m.author == "assistant" && m.recipient.is_some() { t.call } else { t.end });
        Ok(after_role)
    }

    /// Token ids and loss spans of a conversation that ends with the
    /// assistant's answer.
    pub fn render_training(&self, conv: &Conversation, policy: MaskPolicy) -> Result<Rendered> {
        if let Some((i, _, msg)) = structure_problem(&conv.messages, Some(true)) {
            return Err(Error::Conversation(format!("message {i}: {msg}")));
        }
        let msgs = self.harmony_messages(conv)?;
        let mut ids = Vec::new();
        let mut bounds = Vec::with_capacity(msgs.len());
        for m in &msgs {
            let start = ids.len();
            let after_role = self.render_message(m, &mut ids)?;
            bounds.push((start, after_role, ids.len()));
        }
        if msgs.last().is_some_and(|m| m.part == Part::Final) {
            if let Some(last) = ids.last_mut() {
                *last = self.tokenizer.harmony_tokens().return_;
            }
        }
        let last_user = msgs.iter().rposition(|m| m.author == "user");
        let in_last_turn = |i: usize| last_user.is_none_or(|u| i > u);
        let mut trained: Vec<Range<usize>> = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            let (_, after_role, end) = bounds[i];
            let take = match policy {
                MaskPolicy::LastTurn => m.part != Part::Prompt && in_last_turn(i),
                MaskPolicy::AllTurns => m.part != Part::Prompt,
                MaskPolicy::FinalOnly => m.part == Part::Final && in_last_turn(i),
            };
            if !take {
                continue;
            }
            // Consecutive generated messages form one span: the model also
            // writes the `<|end|><|start|>assistant` between them.
            match trained.last_mut() {
                Some(r) if r.end == bounds[i].0 && policy != MaskPolicy::FinalOnly => r.end = end,
                _ => trained.push(after_role..end),
            }
        }
        Ok(Rendered { input_ids: ids, trained })
    }

    /// The prompt for generating the assistant's next message: the
    /// conversation (ending with a user or tool message) followed by
    /// `<|start|>assistant`.
    pub fn render_prompt(&self, conv: &Conversation) -> Result<Vec<u32>> {
        if let Some((i, _, msg)) = structure_problem(&conv.messages, Some(false)) {
            return Err(Error::Conversation(format!("message {i}: {msg}")));
        }
        let mut ids = Vec::new();
        for m in &self.harmony_messages(conv)? {
            self.render_message(m, &mut ids)?;
        }
        ids.push(self.tokenizer.harmony_tokens().start);
        self.encode_into("assistant", &mut ids)?;
        Ok(ids)
    }

    /// Parses tokens generated after a prompt from [`Renderer::render_prompt`].
    pub fn parse_completion(&self, tokens: &[u32]) -> Result<Completion> {
        parse_completion(&self.tokenizer, tokens)
    }
}

/// One message the model generated.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ParsedMessage {
    pub role: String,
    pub channel: Option<String>,
    /// `functions.NAME` for a tool call.
    pub recipient: Option<String>,
    pub content_type: Option<String>,
    pub content: String,
}

/// Why parsing stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Stop {
    /// `<|return|>`: the final answer is complete.
    Return,
    /// `<|call|>`: the last message is a tool call to execute.
    Call,
    /// `<|end|>` with nothing after it.
    End,
    /// The tokens ran out inside a message (e.g. the token budget was hit).
    Incomplete,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Completion {
    pub messages: Vec<ParsedMessage>,
    pub stop: Stop,
}

impl Completion {
    /// The chain of thought (analysis messages joined by newlines), if any.
    pub fn analysis(&self) -> Option<String> {
        let parts: Vec<&str> = self
            .messages
            .iter()
            .filter(|m| m.channel.as_deref() == Some("analysis"))
            .map(|m| m.content.as_str())
            .collect();
        (!parts.is_empty()).then(|| parts.join("\n"))
    }

    /// The last final-channel message.
    pub fn final_text(&self) -> Option<&str> {
        self.messages.iter().rev().find(|m| m.channel.as_deref() == Some("final")).map(|m| m.content.as_str())
    }
}

/// Parses generated tokens that follow `<|start|>assistant`, up to
/// `<|return|>` or `<|call|>` (what comes after is ignored). Header parsing
/// follows harmony's `StreamableParser`: the recipient may come before or
/// after the channel.
pub fn parse_completion(tok: &Tokenizer, tokens: &[u32]) -> Result<Completion> {
    let t = tok.harmony_tokens();
    let mut messages = Vec::new();
    let mut role = Some("assistant".to_string());
    let mut i = 0;
    loop {
        if role.is_none() {
            match tokens.get(i) {
                None => return Ok(Completion { messages, stop: Stop::End }),
                Some(&s) if s == t.start => i += 1,
                Some(&other) => {
                    return Err(Error::Completion(format!(
                        "expected <|start|> after <|end|> at token {i}, found id {other}"
                    )))
                }
            }
        }
        let header_start = i;
        while i < tokens.len() && tokens[i] != t.message {
            if [t.end, t.return_, t.call, t.start].contains(&tokens[i]) {
                return Err(Error::Completion(format!("message header ended at token {i} without <|message|>")));
            }
            i += 1;
        }
        if i == tokens.len() {
            return Err(Error::Completion("the tokens end inside a message header".to_string()));
        }
        let header = tok.decode(&tokens[header_start..i])?;
        let mut msg = parse_header(&header, role.take())?;
        i += 1;
        let content_start = i;
        while i < tokens.len() && ![t.end, t.return_, t.call].contains(&tokens[i]) {
            i += 1;
        }
        msg.content = tok.decode(&tokens[content_start..i])?;
        messages.push(msg);
        let stop = match tokens.get(i) {
            None => Some(Stop::Incomplete),
            Some(&s) if s == t.return_ => Some(Stop::Return),
            Some(&s) if s == t.call => Some(Stop::Call),
            Some(_) => None,
        };
        if let Some(stop) = stop {
            return Ok(Completion { messages, stop });
        }
        i += 1;
    }
}

fn parse_header(header: &str, known_role: Option<String>) -> Result<ParsedMessage> {
    let mut rest = header.to_string();
    let mut channel = None;
    if let Some(idx) = rest.find("<|channel|>") {
        let after = &rest[idx + "<|channel|>".len()..];
        let end = after.find(|c: char| c.is_whitespace() || c == '<').unwrap_or(after.len());
        if end == 0 {
            return Err(Error::Completion(format!("header {header:?} has <|channel|> without a channel name")));
        }
        channel = Some(after[..end].to_string());
        rest = format!("{}{}", &rest[..idx], &after[end..]);
    }
    let rest = rest.replace("<|constrain|>", " <|constrain|>");
    let mut parts: Vec<&str> = rest.split_ascii_whitespace().collect();
    let role = match known_role {
        Some(r) => r,
        None if parts.is_empty() => return Err(Error::Completion(format!("header {header:?} has no role"))),
        None => parts.remove(0).to_string(),
    };
    if parts.first() == Some(&role.as_str()) {
        parts.remove(0);
    }
    let mut recipient = None;
    let mut content_type = None;
    if let Some(last) = parts.pop() {
        if let Some(r) = last.strip_prefix("to=") {
            recipient = Some(r.to_string());
        } else if parts.is_empty() {
            recipient = Some(last.to_string());
        } else {
            content_type = Some(last.to_string());
            if let Some(r) = parts.pop() {
                recipient = Some(r.strip_prefix("to=").unwrap_or(r).to_string());
            }
        }
    }
    if !parts.is_empty() {
        return Err(Error::Completion(format!("unexpected text {:?} in message header {header:?}", parts.join(" "))));
    }
    Ok(ParsedMessage { role, channel, recipient, content_type, content: String::new() })
}
