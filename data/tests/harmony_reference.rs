//! Token ids, loss spans and completion parsing against fixtures written by
//! OpenAI's `openai-harmony` (scripts/data_fixtures.py).

use oxtune_data::{
    load_bytes, parse_completion, Conversation, LoadOptions, MaskPolicy, ReasoningEffort, Renderer, Stop, SystemConfig,
    Tokenizer,
};
use serde_json::Value;

fn fixture(name: &str) -> Vec<Value> {
    let path = format!("{}/../fixtures/data/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}; run scripts/data_fixtures.py"))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn system_config(v: &Value) -> SystemConfig {
    let mut c = SystemConfig::default();
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(String::from);
    if let Some(x) = s("model_identity") {
        c.model_identity = Some(x);
    }
    if let Some(x) = s("knowledge_cutoff") {
        c.knowledge_cutoff = Some(x);
    }
    c.current_date = s("current_date");
    if let Some(x) = s("reasoning_effort") {
        c.reasoning_effort = ReasoningEffort::parse(&x);
    }
    if let Some(ch) = v.get("valid_channels").and_then(Value::as_array) {
        c.valid_channels = ch.iter().map(|x| x.as_str().unwrap().to_string()).collect();
    }
    c
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn training_renderings_match_openai_harmony() {
    let tok = Tokenizer::o200k_harmony().unwrap();
    let cases = fixture("harmony_training.jsonl");
    assert!(cases.len() >= 20);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let opts = LoadOptions {
            mask: match case["mask"].as_str().unwrap() {
                "last" => MaskPolicy::LastTurn,
                "all" => MaskPolicy::AllTurns,
                "final" => MaskPolicy::FinalOnly,
                other => panic!("{other}"),
            },
            system: system_config(&case["system"]),
            ..LoadOptions::default()
        };
        let line = case["line"].as_str().unwrap();
        let ds = load_bytes(name, line.as_bytes(), &opts, &tok).unwrap_or_else(|e| panic!("{name}: {e}"));
        let ex = &ds.examples[0];
        let want = ids(&case["input_ids"]);
        assert_eq!(
            ex.input_ids,
            want,
            "{name}: ids differ\nours: {}\nwant: {}",
            tok.decode(&ex.input_ids).unwrap(),
            case["text"].as_str().unwrap()
        );
        let mut want_labels = vec![-100i32; want.len()];
        for span in case["spans"].as_array().unwrap() {
            let (a, b) = (span[0].as_u64().unwrap() as usize, span[1].as_u64().unwrap() as usize);
            for i in a..b {
                want_labels[i] = want[i] as i32;
            }
        }
        assert_eq!(ex.labels, want_labels, "{name}: labels differ");
        assert_eq!(ds.report.trainable_tokens, ex.trainable_tokens());
    }
}

#[test]
fn generation_prompts_match_openai_harmony() {
    let tok = Tokenizer::o200k_harmony().unwrap();
    for case in fixture("harmony_completion.jsonl") {
        let name = case["name"].as_str().unwrap();
        let conv = Conversation::from_json(case["line"].as_str().unwrap()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let renderer = Renderer::new(tok.clone(), system_config(&case["system"]));
        let got = renderer.render_prompt(&conv).unwrap();
        assert_eq!(got, ids(&case["input_ids"]), "{name}");
        assert_eq!(&got[got.len() - 2..], &[200006, 173781], "{name}: ends with <|start|>assistant");
    }
}

#[test]
fn completions_parse_like_openai_harmony() {
    let tok = Tokenizer::o200k_harmony().unwrap();
    for case in fixture("harmony_parse.jsonl") {
        let name = case["name"].as_str().unwrap();
        let got = parse_completion(&tok, &ids(&case["tokens"])).unwrap();
        let want = case["messages"].as_array().unwrap();
        assert_eq!(got.messages.len(), want.len(), "{name}");
        for (g, w) in got.messages.iter().zip(want) {
            let s = |k: &str| w[k].as_str().map(String::from);
            assert_eq!(g.channel, s("channel"), "{name}");
            assert_eq!(g.recipient, s("recipient"), "{name}");
            assert_eq!(g.content_type, s("content_type"), "{name}");
            assert_eq!(Some(g.content.clone()), s("content"), "{name}");
        }
        let last = ids(&case["tokens"]).last().copied();
        let want_stop = match last {
            Some(200002) => Stop::Return,
            Some(200012) => Stop::Call,
            _ => Stop::Incomplete,
        };
        assert_eq!(got.stop, want_stop, "{name}");
    }
}

#[test]
fn parsed_completion_exposes_analysis_and_final_text() {
    let tok = Tokenizer::o200k_harmony().unwrap();
    let case = fixture("harmony_parse.jsonl").into_iter().find(|c| c["name"] == "analysis_then_final").unwrap();
    let mut tokens = ids(&case["tokens"]);
    // Whatever follows <|return|> is not part of the answer.
    tokens.extend([200006, 1428]);
    let got = parse_completion(&tok, &tokens).unwrap();
    assert_eq!(got.analysis().as_deref(), Some("Người dùng chào."));
    assert_eq!(got.final_text(), Some("Xin chào! Tôi là Thang."));
}

#[test]
fn training_completion_round_trips_through_the_parser() {
    // The trained span of a rendered example is exactly what the model
    // generates, so parsing it gives back the answer.
    let tok = Tokenizer::o200k_harmony().unwrap();
    let conv = Conversation::from_json(
        r#"{"messages": [{"role": "user", "content": "Bạn tên gì?"}, {"role": "assistant", "thinking": "Hỏi tên.", "content": "Tôi là Thang."}]}"#,
    )
    .unwrap();
    let r = Renderer::new(tok.clone(), SystemConfig::default()).render_training(&conv, MaskPolicy::LastTurn).unwrap();
    let span = r.trained[0].clone();
    let got = parse_completion(&tok, &r.input_ids[span]).unwrap();
    assert_eq!(got.analysis().as_deref(), Some("Hỏi tên."));
    assert_eq!(got.final_text(), Some("Tôi là Thang."));
    assert_eq!(got.stop, Stop::Return);
}

#[test]
fn malformed_completions_are_errors_not_panics() {
    let tok = Tokenizer::o200k_harmony().unwrap();
    for bad in [
        vec![200005, 17196, 200002],                  // <|channel|>final<|return|>: no <|message|>
        vec![200005, 200008, 1, 200002],              // channel marker without a name
        vec![200005, 17196],                          // ends inside the header
        vec![200005, 17196, 200008, 1, 200007, 1428], // not <|start|> after <|end|>
    ] {
        assert!(parse_completion(&tok, &bad).is_err(), "{bad:?}");
    }
    let empty = parse_completion(&tok, &[]);
    assert!(empty.is_err());
}
