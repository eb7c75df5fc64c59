//! The o200k_harmony tokenizer behind the `tokenizers` crate.
//!
//! A model directory's `tokenizer.json` loads as is. The built-in tokenizer is
//! converted offline from the o200k ranks that tiktoken-rs ships, the way
//! transformers' `TikTokenConverter` does it (spec gptoss.md §6), and gets the
//! harmony special tokens 199998..=201087 so that every row of the model's
//! embedding has a token.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{Error, Result};

/// Number of o200k_base ranks (ordinary tokens 0..199_998).
pub const O200K_RANKS: u32 = 199_998;
/// Model vocabulary of gpt-oss: ordinary tokens plus harmony specials.
pub const O200K_HARMONY_VOCAB: u32 = 201_088;

/// Named harmony special tokens (gptoss.md §5.1); the other ids up to 201087
/// are `<|reserved_N|>`.
pub const NAMED_SPECIALS: [(&str, u32); 9] = [
    ("<|startoftext|>", 199_998),
    ("<|endoftext|>", 199_999),
    ("<|return|>", 200_002),
    ("<|constrain|>", 200_003),
    ("<|channel|>", 200_005),
    ("<|start|>", 200_006),
    ("<|end|>", 200_007),
    ("<|message|>", 200_008),
    ("<|call|>", 200_012),
];

/// Ids of the formatting tokens the harmony renderer and parser use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HarmonyTokens {
    pub start: u32,
    pub end: u32,
    pub message: u32,
    pub channel: u32,
    pub constrain: u32,
    pub return_: u32,
    pub call: u32,
}

/// A tokenizer for GPT-OSS: ordinary-text encoding, decoding, special tokens.
///
/// Cheap to clone (shared).
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    specials: Arc<HashMap<String, u32>>,
    special_ids: Arc<std::collections::HashSet<u32>>,
    vocab_size: usize,
    harmony: HarmonyTokens,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("specials", &self.specials.len())
            .finish()
    }
}

/// The built-in tokenizer and how long converting it took.
static BUILTIN: OnceLock<(Tokenizer, Duration)> = OnceLock::new();

impl Tokenizer {
    /// The built-in o200k_harmony tokenizer, converted once per process
    /// and shared.
    ///
    /// There is deliberately no disk cache: converting the ranks takes about
    /// 0.75 s on one core, while `tokenizers` needs about 1.05 s just to load
    /// the resulting 12 MB tokenizer.json (it rebuilds the same merge table
    /// after parsing the JSON), so a cached file would be slower than
    /// converting again.
    pub fn o200k_harmony() -> Result<Tokenizer> {
        if let Some((tok, _)) = BUILTIN.get() {
            return Ok(tok.clone());
        }
        let t0 = Instant::now();
        let tok = Self::build_o200k_harmony()?;
        Ok(BUILTIN.get_or_init(|| (tok, t0.elapsed())).0.clone())
    }

    /// How long the process-wide built-in tokenizer took to convert, once
    /// [`Tokenizer::o200k_harmony`] has run.
    pub fn builtin_build_time() -> Option<Duration> {
        BUILTIN.get().map(|(_, d)| *d)
    }

    /// Converts the o200k ranks again, without the process-wide sharing.
    pub fn build_o200k_harmony() -> Result<Tokenizer> {
        Self::from_inner(convert_o200k_harmony(&o200k_ranks()?)?, None)
    }

    /// Writes a Hugging Face `tokenizer.json` (e.g. next to an exported model).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let mut inner = (*self.inner).clone();
        inner.set_encode_special_tokens(false);
        inner
            .save(path.as_ref(), false)
            .map_err(|e| Error::Tokenizer(format!("writing {}: {e}", path.as_ref().display())))
    }

    /// Loads `DIR/tokenizer.json` of a model directory.
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Tokenizer> {
        Self::from_file(dir.as_ref().join("tokenizer.json"))
    }

    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Tokenizer> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| Error::Read { path: path.to_path_buf(), source })?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::TokenizerFile { path: path.to_path_buf(), message: e.to_string() })?;
        Self::from_inner(inner, Some(path))
    }

    fn from_inner(mut inner: tokenizers::Tokenizer, path: Option<&Path>) -> Result<Tokenizer> {
        // Harmony renders every text piece with `encode_ordinary`: text that
        // merely looks like `<|end|>` must not become the special token.
        inner.set_encode_special_tokens(true);
        let specials: HashMap<String, u32> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (t.content, id))
            .collect();
        let get = |name: &str| {
            specials.get(name).copied().ok_or_else(|| match path {
                Some(p) => Error::TokenizerFile {
                    path: p.to_path_buf(),
                    message: format!("it has no special token {name}; use the tokenizer.json of a GPT-OSS model"),
                },
                None => Error::MissingSpecialToken(name.to_string()),
            })
        };
        let inner_vocab = inner.get_vocab_size(true);
        let harmony = HarmonyTokens {
            start: get("<|start|>")?,
            end: get("<|end|>")?,
            message: get("<|message|>")?,
            channel: get("<|channel|>")?,
            constrain: get("<|constrain|>")?,
            return_: get("<|return|>")?,
            call: get("<|call|>")?,
        };
        Ok(Tokenizer {
            inner: Arc::new(inner),
            special_ids: Arc::new(specials.values().copied().collect()),
            specials: Arc::new(specials),
            vocab_size: inner_vocab,
            harmony,
        })
    }

    /// Encodes ordinary text: special-token text is tokenized as plain text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text; special tokens appear as their names and invalid
    /// UTF-8 (a token sequence cut inside a character) as U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Id of a special token such as `<|return|>`.
    pub fn special_token_id(&self, name: &str) -> Option<u32> {
        self.specials.get(name).copied()
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    /// One past the largest id the tokenizer knows (201088 for the built-in
    /// one; a hub tokenizer.json that lists fewer specials reports less than
    /// the model's embedding rows).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn harmony_tokens(&self) -> HarmonyTokens {
        self.harmony
    }
}

/// The byte strings of o200k_base, indexed by rank.
fn o200k_ranks() -> Result<Vec<Vec<u8>>> {
    let core = tiktoken_rs::o200k_base_singleton();
    (0..O200K_RANKS)
        .map(|rank| {
            core.decode_bytes(&[rank]).map_err(|e| Error::Tokenizer(format!("o200k rank {rank} is missing: {e:?}")))
        })
        .collect()
}

/// A multiply-rotate hash (as in rustc's FxHash) for the merge search: the
/// keys are trusted rank bytes, and SipHash made the search 4x slower.
#[derive(Clone, Copy, Default)]
struct FastHash;

#[derive(Default)]
struct FastHasher(u64);

impl std::hash::BuildHasher for FastHash {
    type Hasher = FastHasher;
    fn build_hasher(&self) -> FastHasher {
        FastHasher(0)
    }
}

impl std::hash::Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_usize(&mut self, x: usize) {
        self.write_u64(x as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// GPT-2's reversible byte → printable character map (`bytes_to_unicode`).
pub(crate) fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or('\u{FFFD}');
            next += 1;
            c
        };
    }
    table
}

/// Merges of the tiktoken → BPE conversion, as rank triples
/// `(merged, left, right)`, in priority order.
///
/// Every split of a token into two tokens is a candidate; within a token they
/// are ordered by (left rank, right rank), and tokens by rank, so the BPE
/// model merges the lowest-rank result first, as tiktoken does.
pub(crate) fn o200k_merges(ranks: &[Vec<u8>]) -> Vec<(u32, u32, u32)> {
    let mut index: HashMap<&[u8], u32, FastHash> = HashMap::with_capacity_and_hasher(ranks.len(), FastHash);
    index.extend(ranks.iter().enumerate().map(|(r, b)| (b.as_slice(), r as u32)));
    let mut merges = Vec::with_capacity(450_000);
    let mut local = Vec::new();
    for (rank, token) in ranks.iter().enumerate() {
        local.clear();
        for cut in 1..token.len() {
            if let (Some(&l), Some(&r)) = (index.get(&token[..cut]), index.get(&token[cut..])) {
                local.push((rank as u32, l, r));
            }
        }
        local.sort_by_key(|&(_, l, r)| (l, r));
        merges.extend_from_slice(&local);
    }
    merges
}

fn convert_o200k_harmony(ranks: &[Vec<u8>]) -> Result<tokenizers::Tokenizer> {
    let table = byte_to_char();
    let mapped: Vec<String> = ranks.iter().map(|b| b.iter().map(|&x| table[x as usize]).collect()).collect();
    let vocab: Vocab = mapped.iter().enumerate().map(|(r, s)| (s.clone(), r as u32)).collect();
    let merges = o200k_merges(ranks)
        .into_iter()
        .map(|(_, l, r)| (mapped[l as usize].clone(), mapped[r as usize].clone()))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(true)
        .fuse_unk(false)
        .build()
        .map_err(|e| Error::Tokenizer(format!("building the o200k BPE model: {e}")))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let split = Split::new(
        SplitPattern::Regex(tiktoken_rs::O200K_BASE_PAT_STR.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| Error::Tokenizer(format!("compiling the o200k pattern: {e}")))?;
    tok.with_pre_tokenizer(Some(Sequence::new(vec![split.into(), ByteLevel::new(false, false, false).into()])));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    let named: HashMap<u32, &str> = NAMED_SPECIALS.iter().map(|&(n, id)| (id, n)).collect();
    let specials: Vec<AddedToken> = (O200K_RANKS..O200K_HARMONY_VOCAB)
        .map(|id| {
            let name = named.get(&id).map_or_else(|| format!("<|reserved_{id}|>"), |n| n.to_string());
            AddedToken::from(name, true).normalized(false)
        })
        .collect();
    tok.add_special_tokens(&specials);
    Ok(tok)
}
