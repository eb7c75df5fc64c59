//! Bad input never panics and never passes silently: each problem is a
//! diagnostic at file:line:column with a reason and what was expected.
//! Expected columns are counted by hand from the literal lines.

use oxtune_data::{load_bytes, load_file, Dataset, Diagnostic, Error, LoadOptions, Reason, Tokenizer, Truncation};
use proptest::prelude::*;

fn tok() -> Tokenizer {
    Tokenizer::o200k_harmony().unwrap()
}

fn load(text: &[u8], opts: &LoadOptions) -> Result<Dataset, Error> {
    load_bytes("t.jsonl", text, opts, &tok())
}

/// The single diagnostic of a one-example file.
fn diag(text: &str) -> Diagnostic {
    diag_bytes(text.as_bytes())
}

fn diag_bytes(text: &[u8]) -> Diagnostic {
    match load(text, &LoadOptions::default()) {
        Err(Error::Invalid(d)) => d,
        other => panic!("expected an invalid example, got {other:?}"),
    }
}

fn at(d: &Diagnostic) -> (usize, usize, Reason) {
    (d.location.line, d.location.column, d.reason)
}

const OK: &str = r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"chào"}]}"#;

#[test]
fn seed_file_trailing_bracket_is_malformed_json_at_the_bracket() {
    let path = format!("{}/../fixtures/data/seed-examples.jsonl", env!("CARGO_MANIFEST_DIR"));
    let first_line = std::fs::read_to_string(&path).unwrap().lines().next().unwrap().to_string();
    assert!(first_line.ends_with("]]}"));
    let err = load_file(&path, &LoadOptions::default(), &tok()).unwrap_err();
    let Error::Invalid(d) = &err else { panic!("{err}") };
    // The second-to-last character: the `]` that closes nothing.
    assert_eq!(at(d), (1, first_line.chars().count() - 1, Reason::MalformedJson));
    assert!(err.to_string().starts_with(&format!("{path}:1:")), "{err}");
    assert!(d.message.contains("expected `,` or `}`"), "{}", d.message);

    let opts = LoadOptions { skip_invalid: true, ..LoadOptions::default() };
    let ds = load_bytes("seed", &std::fs::read(&path).unwrap(), &opts, &tok()).unwrap();
    assert_eq!(ds.examples.len(), 0);
    assert_eq!(ds.report.skipped.get(&Reason::MalformedJson), Some(&6));
    assert_eq!(ds.report.diagnostics.len(), 6);
    assert!(matches!(load_file(&path, &opts, &tok()), Err(Error::NoExamples { .. })));
}

#[test]
fn seed_role_with_comma_suggests_system() {
    let line = r#"{"messages": [{"role": "system,", "content": "Bạn là Thang"}, {"role": "user", "content": "Bạn tên là gì? "}, {"role": "assistant", "content": " Tôi tên là Thang Nguyen."}]}"#;
    let d = diag(line);
    assert_eq!(at(&d), (1, 24, Reason::UnknownRole));
    assert!(d.message.contains("did you mean \"system\"?"), "{}", d.message);
    assert!(d.message.contains("system, developer, user, assistant, tool"));
}

#[test]
fn columns_count_characters_not_bytes() {
    let d = diag(r#"{"messages":[{"role":"user","content":"Tiếng Việt"},{"role":"asistant","content":"x"}]}"#);
    assert_eq!(at(&d), (1, 61, Reason::UnknownRole));
    assert!(d.message.contains("did you mean \"assistant\"?"));
}

#[test]
fn empty_content_points_at_the_content() {
    let d = diag(r#"{"messages":[{"role":"user","content":"  "},{"role":"assistant","content":"x"}]}"#);
    assert_eq!(at(&d), (1, 39, Reason::EmptyContent));
    let d = diag(r#"{"messages":[{"role":"user"},{"role":"assistant","content":"x"}]}"#);
    assert_eq!(d.reason, Reason::EmptyContent);
    assert!(d.message.contains("no \"content\""));
}

#[test]
fn conversation_without_an_answer_is_rejected() {
    let d = diag(r#"{"messages":[{"role":"user","content":"hi"}]}"#);
    assert_eq!(d.reason, Reason::NoAssistantTurn);
    assert!(d.message.contains("no assistant message"));
    // Ends with a user message: pointed at that message.
    let d = diag(
        r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"},{"role":"user","content":"c"}]}"#,
    );
    assert_eq!(at(&d), (1, 79, Reason::NoAssistantTurn));
    let d = diag(r#"{"messages":[]}"#);
    assert_eq!(d.reason, Reason::NoAssistantTurn);
}

#[test]
fn not_utf8_names_the_byte_and_its_column() {
    let mut line = br#"{"messages":[{"role":"user","content":"caf"#.to_vec();
    line.push(0xFF);
    line.extend_from_slice(br#""},{"role":"assistant","content":"x"}]}"#);
    let d = diag_bytes(&line);
    assert_eq!(at(&d), (1, 43, Reason::NotUtf8));
    assert!(d.message.contains("0xFF") && d.message.contains("UTF-8"));
}

#[test]
fn errors_name_the_right_line() {
    let text = format!("{OK}\n\n{OK}\r\n{{\"messages\": 3}}\n");
    let d = diag(&text);
    assert_eq!(at(&d), (4, 14, Reason::InvalidField));
    assert!(d.message.contains("expected messages to be an array, found a number"));
}

#[test]
fn mixed_and_unknown_formats() {
    let sharegpt = r#"{"conversations":[{"from":"human","value":"a"},{"from":"gpt","value":"b"}]}"#;
    let d = diag(&format!("{OK}\n{sharegpt}"));
    assert_eq!(at(&d), (2, 1, Reason::MixedFormats));
    assert!(d.message.contains("ShareGPT") && d.message.contains("line 1"));
    let d = diag(r#"{"text": "x"}"#);
    assert_eq!(d.reason, Reason::UnknownFormat);
    assert!(d.message.contains("\"text\""));
    let d = diag(r#"{"conversations":[{"from":"humann","value":"a"},{"from":"gpt","value":"b"}]}"#);
    assert_eq!(d.reason, Reason::UnknownRole);
    assert!(d.message.contains("did you mean \"human\"?"));
}

#[test]
fn misspelt_and_misplaced_fields() {
    let d = diag(r#"{"messages":[{"role":"user","contnet":"a"},{"role":"assistant","content":"b"}]}"#);
    assert_eq!(at(&d), (1, 29, Reason::InvalidField));
    assert!(d.message.contains("did you mean \"content\"?"));
    let d = diag(
        r#"{"messages":[{"role":"user","content":"a"},{"role":"system","content":"s"},{"role":"assistant","content":"b"}]}"#,
    );
    assert_eq!(d.reason, Reason::MisplacedMessage);
    let d = diag(
        r#"{"reasoning_effort":"hgih","messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]}"#,
    );
    assert_eq!(at(&d), (1, 21, Reason::InvalidField));
    assert!(d.message.contains("did you mean \"high\"?"));
    let d = diag(
        r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant","tool_calls":[{"function":{"name":"f","arguments":"{city: 1}"}}]}]}"#,
    );
    assert_eq!(d.reason, Reason::InvalidField);
    assert!(d.message.contains("arguments are not valid JSON"));
    let d = diag(
        r#"{"messages":[{"role":"user","content":"a"},{"role":"tool","content":"r"},{"role":"assistant","content":"b"}]}"#,
    );
    assert!(d.message.contains("tool_call_id"));
}

#[test]
fn too_long_examples_follow_the_truncation_policy() {
    let long = r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"một câu trả lời khá dài để vượt quá giới hạn"}]}"#;
    let text = format!("{OK}\n{long}\n");
    let full = load(text.as_bytes(), &LoadOptions::default()).unwrap();
    let (short_len, long_len) = (full.examples[0].len(), full.examples[1].len());
    let max_len = long_len - 3;
    assert!(short_len <= max_len);
    let with = |truncation| LoadOptions { max_len: Some(max_len), truncation, ..LoadOptions::default() };

    let err = load(text.as_bytes(), &with(Truncation::Error)).unwrap_err();
    let Error::Invalid(d) = err else { panic!() };
    assert_eq!((d.location.line, d.reason), (2, Reason::TooLong));
    assert!(d.message.contains(&format!("{long_len} tokens")));

    let dropped = load(text.as_bytes(), &with(Truncation::Drop)).unwrap();
    assert_eq!((dropped.examples.len(), dropped.report.dropped), (1, 1));

    let cut = load(text.as_bytes(), &with(Truncation::Truncate)).unwrap();
    assert_eq!(cut.report.truncated, 1);
    assert_eq!(cut.examples[1].len(), max_len);
    assert!(cut.examples[1].truncated);
    assert_eq!(cut.examples[1].trainable_tokens(), full.examples[1].trainable_tokens() - 3);

    // Cut before the answer starts: nothing left to learn, so dropped.
    let tiny = LoadOptions { max_len: Some(5), truncation: Truncation::Truncate, ..LoadOptions::default() };
    let none = load(text.as_bytes(), &tiny).unwrap();
    assert_eq!((none.examples.len(), none.report.dropped), (0, 2));
}

#[test]
fn skip_invalid_counts_every_reason() {
    let text = [
        OK,
        r#"{"messages":[{"role":"usr","content":"a"},{"role":"assistant","content":"b"}]}"#,
        r#"{"messages":[{"role":"user","content":""},{"role":"assistant","content":"b"}]}"#,
        r#"{"messages":[{"role":"user","content":"a"}]"#,
        r#"{"messages":[{"role":"user","content":"a"}]}"#,
        OK,
    ]
    .join("\n");
    let opts = LoadOptions { skip_invalid: true, ..LoadOptions::default() };
    let ds = load(text.as_bytes(), &opts).unwrap();
    assert_eq!(ds.examples.len(), 2);
    assert_eq!(ds.report.lines, 6);
    let counts: Vec<(Reason, usize)> = ds.report.skipped.iter().map(|(r, n)| (*r, *n)).collect();
    assert_eq!(
        counts,
        vec![
            (Reason::MalformedJson, 1),
            (Reason::UnknownRole, 1),
            (Reason::EmptyContent, 1),
            (Reason::NoAssistantTurn, 1),
        ]
    );
    let lines: Vec<usize> = ds.report.diagnostics.iter().map(|d| d.location.line).collect();
    assert_eq!(lines, vec![2, 3, 4, 5]);
    assert_eq!(ds.examples[1].line, 6);
}

#[test]
fn bom_blank_lines_and_crlf_are_fine() {
    let text = format!("\u{feff}{OK}\r\n\r\n   \n{OK}");
    let ds = load(text.as_bytes(), &LoadOptions::default()).unwrap();
    assert_eq!(ds.examples.len(), 2);
    assert_eq!(ds.examples[1].line, 4);
    assert_eq!(ds.examples[0].input_ids, ds.examples[1].input_ids);
    assert_eq!(ds.examples[0].labels, ds.examples[1].labels);
}

#[test]
fn untrimmed_messages_are_counted_not_changed() {
    let seed_fixed = r#"{"messages": [{"role": "system", "content": "Bạn là Thang"}, {"role": "user", "content": "Bạn tên là gì? "}, {"role": "assistant", "content": " Tôi tên là Thang Nguyen."}]}"#;
    let ds = load(seed_fixed.as_bytes(), &LoadOptions::default()).unwrap();
    assert_eq!(ds.report.untrimmed_messages, 2);
    let text = tok().decode(&ds.examples[0].input_ids).unwrap();
    assert!(text.contains("<|message|> Tôi tên là Thang Nguyen.<|return|>"));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        for skip_invalid in [false, true] {
            let opts = LoadOptions { skip_invalid, max_len: Some(64), truncation: Truncation::Drop, ..LoadOptions::default() };
            if let Ok(ds) = load(&bytes, &opts) {
                let r = &ds.report;
                prop_assert_eq!(r.examples + r.dropped + r.skipped_total(), r.lines);
            }
        }
    }

    /// Near-valid JSONL: fragments of real lines glued together, which
    /// reaches the format and message parsers far more often than noise.
    #[test]
    fn mangled_jsonl_never_panics(parts in proptest::collection::vec(prop_oneof![
        Just(r#"{"messages":["#), Just(r#"{"role":"user","content":"a"}"#),
        Just(r#"{"role":"assistant","content":"b","thinking":"t"}"#), Just(","), Just("]}"),
        Just(r#"{"role":"tool","tool_call_id":"x","content":"r"}"#),
        Just(r#"{"role":"assistant","tool_calls":[{"id":"x","function":{"name":"f","arguments":{}}}]}"#),
        Just(r#""tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}],"#),
        Just(r#"{"conversations":[{"from":"human","value":"a"}"#), Just(r#"{"instruction":"i","output":"o"}"#),
        Just(r#"{"prompt":"p","completion":"#), Just("\"c\"}"), Just("\n"), Just("\u{fffd}"), Just("\\u"),
    ], 0..24)) {
        let text = parts.concat();
        let opts = LoadOptions { skip_invalid: true, ..LoadOptions::default() };
        let ds = load(text.as_bytes(), &opts).unwrap();
        let r = &ds.report;
        prop_assert_eq!(r.examples + r.dropped + r.skipped_total(), r.lines);
    }
}
