//! The embedded persona dataset loads without arguments and is clean.

use std::collections::HashSet;

use oxtune_data::{
    default_dataset, default_eval_dataset, Conversation, Role, Tokenizer, DEFAULT_EVAL_JSONL, DEFAULT_TRAIN_JSONL,
};

fn user_questions(jsonl: &str) -> Vec<String> {
    jsonl
        .lines()
        .flat_map(|l| Conversation::from_json(l).unwrap().messages)
        .filter(|m| m.role == Role::User)
        .map(|m| m.content)
        .collect()
}

#[test]
fn embedded_train_and_eval_sets_load_cleanly() {
    let train = default_dataset().unwrap();
    let eval = default_eval_dataset().unwrap();
    assert!(train.examples.len() >= 80, "{}", train.examples.len());
    assert!(eval.examples.len() >= 20, "{}", eval.examples.len());
    for ds in [&train, &eval] {
        let r = &ds.report;
        assert_eq!(r.examples, r.lines, "every line is a valid example");
        assert_eq!(r.skipped_total() + r.dropped + r.truncated, 0);
        assert_eq!(r.untrimmed_messages, 0);
        assert!(ds.examples.iter().all(|e| e.trainable_tokens() > 0));
    }
}

#[test]
fn eval_questions_are_not_training_questions() {
    let train: HashSet<String> = user_questions(DEFAULT_TRAIN_JSONL).into_iter().collect();
    let eval = user_questions(DEFAULT_EVAL_JSONL);
    assert!(eval.iter().all(|q| !train.contains(q)));
}

#[test]
fn persona_is_the_developer_message_and_answers_are_short() {
    let tok = Tokenizer::o200k_harmony().unwrap();
    let train = default_dataset().unwrap();
    for ex in &train.examples {
        let text = tok.decode(&ex.input_ids).unwrap();
        assert!(text.contains(
            "<|start|>developer<|message|># Instructions\n\nBạn là Thang Nguyen, một lập trình viên tại Ngân hàng SHB thích AI<|end|>"
        ));
        assert!(text.ends_with("<|return|>"));
        // `<|channel|>final<|message|>` + a short answer + `<|return|>`.
        assert!(ex.trainable_tokens() < 48, "line {}: {}", ex.line, ex.trainable_tokens());
    }
}

#[test]
fn split_is_seeded_disjoint_and_complete() {
    let ds = default_dataset().unwrap();
    let n = ds.examples.len();
    let (train, eval) = ds.clone().split(0.1, 3).unwrap();
    assert_eq!(train.examples.len() + eval.examples.len(), n);
    assert_eq!(eval.examples.len(), (n as f64 * 0.1).round() as usize);
    let lines = |d: &oxtune_data::Dataset| d.examples.iter().map(|e| e.line).collect::<Vec<_>>();
    let (t2, e2) = ds.clone().split(0.1, 3).unwrap();
    assert_eq!((lines(&train), lines(&eval)), (lines(&t2), lines(&e2)));
    let (_, e3) = ds.clone().split(0.1, 4).unwrap();
    assert_ne!(lines(&eval), lines(&e3));
    let mut all: Vec<usize> = lines(&train).into_iter().chain(lines(&eval)).collect();
    all.sort();
    assert_eq!(all, (1..=n).collect::<Vec<_>>());
    assert!(ds.clone().split(1.0, 0).is_err());
    let (_, tiny) = ds.split(0.0001, 0).unwrap();
    assert_eq!(tiny.examples.len(), 1, "a positive ratio keeps at least one");
}
