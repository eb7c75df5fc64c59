//! The built-in o200k_harmony tokenizer against tiktoken (Python, fixture)
//! and tiktoken-rs.

use oxtune_data::{Error, Tokenizer, NAMED_SPECIALS};
use proptest::prelude::*;
use serde_json::Value;

fn fixtures_dir() -> String {
    format!("{}/../fixtures/data", env!("CARGO_MANIFEST_DIR"))
}

fn corpus() -> Vec<(String, Vec<u32>)> {
    std::fs::read_to_string(format!("{}/tokenizer_corpus.jsonl", fixtures_dir()))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let ids = v["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            (v["text"].as_str().unwrap().to_string(), ids)
        })
        .collect()
}

#[test]
fn multilingual_corpus_matches_tiktoken_python_and_rust() {
    let tok = Tokenizer::o200k_harmony().unwrap();
    let rs = tiktoken_rs::o200k_harmony_singleton();
    let corpus = corpus();
    assert!(corpus.len() >= 20);
    for (text, want) in &corpus {
        let got = tok.encode(text).unwrap();
        assert_eq!(&got, want, "python tiktoken differs on {text:?}");
        assert_eq!(got, rs.encode_ordinary(text), "tiktoken-rs differs on {text:?}");
        assert_eq!(&tok.decode(&got).unwrap(), text, "round trip of {text:?}");
    }
}

#[test]
fn embedded_dataset_text_matches_tiktoken_rs() {
    let tok = Tokenizer::o200k_harmony().unwrap();
    let rs = tiktoken_rs::o200k_harmony_singleton();
    for text in [oxtune_data::DEFAULT_TRAIN_JSONL, oxtune_data::DEFAULT_EVAL_JSONL] {
        assert_eq!(tok.encode(text).unwrap(), rs.encode_ordinary(text));
    }
}

#[test]
fn special_tokens_have_harmony_ids() {
    let tok = Tokenizer::o200k_harmony().unwrap();
    let want: serde_json::Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(format!("{}/special_tokens.json", fixtures_dir())).unwrap())
            .unwrap();
    for (name, id) in &want {
        assert_eq!(tok.special_token_id(name), Some(id.as_u64().unwrap() as u32), "{name}");
    }
    assert_eq!(NAMED_SPECIALS.len(), 9);
    assert_eq!(tok.vocab_size(), 201_088);
    assert!(tok.is_special(200_006));
    assert!(!tok.is_special(17_360));
    assert_eq!(tok.special_token_id("<|reserved_201088|>"), None);
    // Decoding shows special tokens by name.
    assert_eq!(tok.decode(&[200_006, 1428, 200_008]).unwrap(), "<|start|>user<|message|>");
}

#[test]
fn special_token_text_encodes_as_ordinary_text() {
    let tok = Tokenizer::o200k_harmony().unwrap();
    let ids = tok.encode("a<|end|>b").unwrap();
    assert!(ids.iter().all(|&i| i < 199_998), "{ids:?}");
    assert_eq!(ids, tiktoken_rs::o200k_harmony_singleton().encode_ordinary("a<|end|>b"));
}

#[test]
fn decode_of_a_cut_character_is_lossy_not_an_error() {
    let tok = Tokenizer::o200k_harmony().unwrap();
    let ids = tok.encode("🇻🇳").unwrap();
    assert!(ids.len() > 1);
    assert!(tok.decode(&ids[..1]).unwrap().contains('\u{FFFD}'));
}

#[test]
fn saved_tokenizer_json_loads_back_from_a_model_dir() {
    let tok = Tokenizer::o200k_harmony().unwrap();
    let dir = std::env::temp_dir().join(format!("oxtune-data-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    tok.save(dir.join("tokenizer.json")).unwrap();
    let back = Tokenizer::from_model_dir(&dir).unwrap();
    for (text, want) in corpus() {
        assert_eq!(back.encode(&text).unwrap(), want, "{text:?}");
    }
    assert_eq!(back.vocab_size(), 201_088);
    assert_eq!(back.harmony_tokens(), tok.harmony_tokens());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_tokenizer_files_are_errors_that_name_the_file() {
    let dir = std::env::temp_dir().join(format!("oxtune-data-badtok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = Tokenizer::from_model_dir(dir.join("nope")).unwrap_err();
    assert!(matches!(missing, Error::Read { .. }), "{missing}");
    assert!(missing.to_string().contains("nope/tokenizer.json"), "{missing}");

    std::fs::write(dir.join("tokenizer.json"), "{ not json").unwrap();
    let garbage = Tokenizer::from_model_dir(&dir).unwrap_err();
    assert!(matches!(garbage, Error::TokenizerFile { .. }), "{garbage}");

    // A valid tokenizer without the harmony specials (a tiny word-level one).
    std::fs::write(
        dir.join("tokenizer.json"),
        r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
            "pre_tokenizer":null,"post_processor":null,"decoder":null,
            "model":{"type":"WordLevel","vocab":{"a":0,"[UNK]":1},"unk_token":"[UNK]"}}"#,
    )
    .unwrap();
    let no_specials = Tokenizer::from_model_dir(&dir).unwrap_err().to_string();
    assert!(no_specials.contains("<|start|>"), "{no_specials}");
    std::fs::remove_dir_all(&dir).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary Unicode, plus words and whitespace that stress the
    /// pre-tokenizer's look-ahead (`\s+(?!\S)`) and contractions.
    #[test]
    fn arbitrary_text_matches_tiktoken_rs(
        text in "(\\PC|[ \\t\\n\\r]{1,4}|'s|'LL|[0-9]{1,5}|Việt|ngữ|\\u{0301})*"
    ) {
        let tok = Tokenizer::o200k_harmony().unwrap();
        let rs = tiktoken_rs::o200k_harmony_singleton();
        let got = tok.encode(&text).unwrap();
        prop_assert_eq!(&got, &rs.encode_ordinary(&text));
        prop_assert_eq!(tok.decode(&got).unwrap(), text);
    }
}
