//! Batches: packing, padding, boundaries, epochs, and exact resume.

use oxtune_data::{BatchConfig, BatchMode, Batcher, BatcherState, Example, IGNORE};

/// Synthetic examples with distinct token values so every token can be
/// traced back: example `k` of length `n` holds `1000*k + i`; its second half
/// carries loss.
fn examples(lengths: &[usize]) -> Vec<Example> {
    lengths
        .iter()
        .enumerate()
        .map(|(k, &n)| {
            let input_ids: Vec<u32> = (0..n as u32).map(|i| 1000 * k as u32 + i).collect();
            let labels =
                input_ids.iter().enumerate().map(|(i, &t)| if i >= n / 2 { t as i32 } else { IGNORE }).collect();
            Example { input_ids, labels, line: k + 1, truncated: false }
        })
        .collect()
}

const LENGTHS: [usize; 10] = [7, 3, 12, 5, 9, 16, 2, 11, 4, 6];

fn config(mode: BatchMode) -> BatchConfig {
    BatchConfig { mode, batch_size: 2, max_len: 16, seed: 7, ..BatchConfig::default() }
}

/// Checks the invariants every batch must hold and returns the examples it
/// contains.
fn check(batch: &oxtune_data::Batch, exs: &[Example], pad_id: u32) -> Vec<usize> {
    let n = batch.rows * batch.row_len;
    assert_eq!(batch.input_ids.len(), n);
    assert_eq!(batch.labels.len(), n);
    assert_eq!(batch.position_ids.len(), n);
    assert_eq!(batch.cu_seqlens.first(), Some(&0));
    assert_eq!(*batch.cu_seqlens.last().unwrap() as usize, n);
    // Sequences never cross a row.
    for r in 0..=batch.rows {
        assert!(batch.cu_seqlens.contains(&((r * batch.row_len) as u32)));
    }
    let mut seen = Vec::new();
    for w in batch.cu_seqlens.windows(2) {
        let (a, b) = (w[0] as usize, w[1] as usize);
        assert!(b > a);
        let pos: Vec<u32> = batch.position_ids[a..b].to_vec();
        assert_eq!(pos, (0..(b - a) as u32).collect::<Vec<_>>(), "positions restart");
        assert_eq!(batch.labels[a], IGNORE, "first token of a sequence is never a target");
        let ids = &batch.input_ids[a..b];
        if ids.iter().all(|&t| t == pad_id) {
            assert!(batch.labels[a..b].iter().all(|&l| l == IGNORE));
            continue;
        }
        let k = (ids[0] / 1000) as usize;
        assert_eq!(ids, &exs[k].input_ids[..], "a sequence is one whole example");
        assert_eq!(&batch.labels[a + 1..b], &exs[k].labels[1..]);
        seen.push(k);
    }
    assert_eq!(seen, batch.example_indices);
    assert_eq!(batch.real_tokens, seen.iter().map(|&k| exs[k].len()).sum::<usize>());
    seen
}

fn one_epoch_covers_every_example_once(mode: BatchMode) {
    let exs = examples(&LENGTHS);
    let cfg = config(mode);
    let mut b = Batcher::new(exs.clone(), cfg.clone()).unwrap();
    let mut all = Vec::new();
    for _ in 0..b.batches_per_epoch() {
        let batch = b.next_batch();
        all.extend(check(&batch, &exs, cfg.pad_id));
        assert_eq!(b.state().epoch, 0);
    }
    all.sort();
    assert_eq!(all, (0..LENGTHS.len()).collect::<Vec<_>>());
    b.next_batch();
    assert_eq!((b.state().epoch, b.state().cursor), (1, 1));
}

#[test]
fn packed_epoch_covers_every_example_once() {
    one_epoch_covers_every_example_once(BatchMode::Packed);
}

#[test]
fn padded_epoch_covers_every_example_once() {
    one_epoch_covers_every_example_once(BatchMode::Padded);
}

#[test]
fn padding_free_epoch_covers_every_example_once() {
    one_epoch_covers_every_example_once(BatchMode::PaddingFree);
}

#[test]
fn packed_rows_are_max_len_and_fill_well() {
    let exs = examples(&LENGTHS);
    let b = Batcher::new(exs, config(BatchMode::Packed)).unwrap();
    let batches: Vec<_> = b.one_epoch().collect();
    let rows: usize = batches.iter().map(|x| x.rows).sum();
    // 75 tokens in rows of 16: best-fit decreasing needs the minimum, 5.
    assert_eq!(LENGTHS.iter().sum::<usize>(), 75);
    assert_eq!(rows, 5);
    assert!(batches.iter().all(|x| x.row_len == 16));
    assert_eq!(batches.iter().map(|x| x.max_seqlen()).max(), Some(16));
}

#[test]
fn padding_free_batches_have_no_padding() {
    let exs = examples(&LENGTHS);
    let b = Batcher::new(exs, config(BatchMode::PaddingFree)).unwrap();
    for batch in b.one_epoch() {
        assert_eq!(batch.rows, 1);
        assert_eq!(batch.real_tokens, batch.row_len);
        assert!(batch.row_len <= 32);
    }
}

#[test]
fn padded_batches_pad_to_their_longest_example() {
    let exs = examples(&LENGTHS);
    let cfg = BatchConfig { shuffle: false, bucket_by_length: false, ..config(BatchMode::Padded) };
    let b = Batcher::new(exs, cfg).unwrap();
    let first = b.one_epoch().next().unwrap();
    // Unshuffled: examples 0 (7) and 1 (3) → rows of 7, 4 pad tokens.
    assert_eq!((first.rows, first.row_len), (2, 7));
    assert_eq!(first.cu_seqlens, vec![0, 7, 10, 14]);
    assert_eq!(&first.input_ids[10..], &[199_999; 4]);
    assert_eq!(&first.position_ids[7..], &[0, 1, 2, 0, 1, 2, 3]);
}

#[test]
fn bucketing_reduces_padding() {
    let lengths: Vec<usize> = (0..64).map(|i| 1 + (i * 37) % 16).collect();
    let exs = examples(&lengths);
    let padding = |bucket| {
        let cfg = BatchConfig { bucket_by_length: bucket, batch_size: 4, ..config(BatchMode::Padded) };
        Batcher::new(exs.clone(), cfg).unwrap().one_epoch().map(|b| b.rows * b.row_len - b.real_tokens).sum::<usize>()
    };
    assert!(padding(true) * 4 < padding(false), "{} vs {}", padding(true), padding(false));
}

#[test]
fn epochs_are_reshuffled_deterministically() {
    let exs = examples(&LENGTHS);
    let cfg = config(BatchMode::Padded);
    let run = || {
        let mut b = Batcher::new(exs.clone(), cfg.clone()).unwrap();
        (0..3 * b.batches_per_epoch()).map(|_| b.next_batch().example_indices).collect::<Vec<_>>()
    };
    let a = run();
    assert_eq!(a, run(), "same seed, same stream");
    let per_epoch = a.len() / 3;
    assert_ne!(a[..per_epoch], a[per_epoch..2 * per_epoch], "new order each epoch");
    let other = {
        let mut b = Batcher::new(exs.clone(), BatchConfig { seed: 8, ..cfg.clone() }).unwrap();
        (0..per_epoch).map(|_| b.next_batch().example_indices).collect::<Vec<_>>()
    };
    assert_ne!(a[..per_epoch], other[..]);
}

#[test]
fn state_saved_as_json_resumes_exactly() {
    let exs = examples(&LENGTHS);
    for mode in [BatchMode::Packed, BatchMode::Padded, BatchMode::PaddingFree] {
        let cfg = config(mode);
        let mut a = Batcher::new(exs.clone(), cfg.clone()).unwrap();
        // Stop mid-way through the second epoch.
        let steps = a.batches_per_epoch() + 1;
        for _ in 0..steps {
            a.next_batch();
        }
        let saved = serde_json::to_string(a.state()).unwrap();
        let want: Vec<_> = (0..2 * a.batches_per_epoch()).map(|_| a.next_batch()).collect();

        let mut b = Batcher::new(exs.clone(), cfg.clone()).unwrap();
        let state: BatcherState = serde_json::from_str(&saved).unwrap();
        b.restore(state.clone()).unwrap();
        assert_eq!(b.state(), &state);
        let got: Vec<_> = (0..want.len()).map(|_| b.next_batch()).collect();
        assert_eq!(got, want, "{mode:?}");
    }
}

#[test]
fn resume_on_other_data_or_config_is_refused() {
    let exs = examples(&LENGTHS);
    let a = Batcher::new(exs.clone(), config(BatchMode::Packed)).unwrap();
    let state = a.state().clone();
    let mut other_data = Batcher::new(examples(&LENGTHS[1..]), config(BatchMode::Packed)).unwrap();
    let e = other_data.restore(state.clone()).unwrap_err().to_string();
    assert!(e.contains("same data"), "{e}");
    let mut other_cfg = Batcher::new(exs, config(BatchMode::Padded)).unwrap();
    assert!(other_cfg.restore(state.clone()).is_err());
    let mut bad_cursor = state;
    bad_cursor.cursor = 1_000;
    assert!(Batcher::new(examples(&LENGTHS), config(BatchMode::Packed)).unwrap().restore(bad_cursor).is_err());
}

#[test]
fn invalid_configs_are_errors() {
    let exs = examples(&LENGTHS);
    let too_short = BatchConfig { max_len: 15, ..config(BatchMode::Packed) };
    let e = Batcher::new(exs.clone(), too_short).unwrap_err().to_string();
    assert!(e.contains("line 6") && e.contains("16 tokens"), "{e}");
    assert!(Batcher::new(Vec::new(), config(BatchMode::Packed)).is_err());
    let zero = BatchConfig { batch_size: 0, ..config(BatchMode::Packed) };
    assert!(Batcher::new(exs, zero).is_err());
}

#[test]
fn real_dataset_packs_with_trainable_tokens_preserved() {
    let ds = oxtune_data::default_dataset().unwrap();
    let total: usize = ds.examples.iter().map(Example::trainable_tokens).sum();
    let cfg = BatchConfig { max_len: 1024, batch_size: 2, ..BatchConfig::default() };
    let b = Batcher::new(ds.examples.clone(), cfg.clone()).unwrap();
    let mut packed = 0;
    for batch in b.one_epoch() {
        check_real(&batch);
        packed += batch.trainable_tokens();
    }
    // Every trained token starts after `<|start|>assistant`, never at a
    // sequence start, so packing loses none.
    assert_eq!(packed, total);
}

fn check_real(batch: &oxtune_data::Batch) {
    for w in batch.cu_seqlens.windows(2) {
        let a = w[0] as usize;
        assert_eq!(batch.position_ids[a], 0);
    }
}
