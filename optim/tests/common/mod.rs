//! Fixture loading and the tolerance check shared by the integration tests.
#![allow(dead_code)] // each test binary uses a different subset of these helpers

use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

pub fn fixture_path(name: &str) -> String {
    format!("{}/../fixtures/optim/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A safetensors fixture file held in memory.
pub struct Fixture {
    bytes: Vec<u8>,
    name: String,
}

impl Fixture {
    pub fn open(name: &str) -> Self {
        let path = fixture_path(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e} (run scripts/optim_fixtures.py)"));
        Self { bytes, name: name.to_string() }
    }

    fn view(&self, key: &str) -> (Dtype, Vec<usize>, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.bytes).expect("valid fixture");
        let t = st.tensor(key).unwrap_or_else(|e| panic!("{}: no tensor {key}: {e}", self.name));
        (t.dtype(), t.shape().to_vec(), t.data().to_vec())
    }

    pub fn f32(&self, key: &str) -> Vec<f32> {
        let (dt, _, data) = self.view(key);
        assert_eq!(dt, Dtype::F32, "{key}");
        data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    }

    pub fn f64(&self, key: &str) -> Vec<f64> {
        let (dt, _, data) = self.view(key);
        assert_eq!(dt, Dtype::F64, "{key}");
        data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect()
    }

    pub fn u8(&self, key: &str) -> Vec<u8> {
        let (dt, _, data) = self.view(key);
        assert_eq!(dt, Dtype::U8, "{key}");
        data
    }
}

/// Asserts `|got - want| <= atol + rtol * |want|` element-wise; the message names the worst element (by
/// its share of the allowed error) and the relative L2 error of the whole tensor.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let (mut worst, mut worst_ratio) = (0usize, 0.0f64);
    let (mut diff2, mut ref2) = (0.0f64, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w as f64).abs();
        let allowed = atol as f64 + rtol as f64 * (w as f64).abs();
        let ratio = if err == 0.0 {
            0.0
        } else if err.is_nan() {
            f64::INFINITY
        } else {
            err / allowed
        };
        if ratio > worst_ratio || i == 0 {
            worst_ratio = ratio;
            worst = i;
        }
        diff2 += err * err;
        ref2 += (w as f64) * (w as f64);
    }
    let rel = (diff2 / ref2.max(f64::MIN_POSITIVE)).sqrt();
    assert!(
        worst_ratio <= 1.0,
        "{what}: element {worst} got {} want {} (|diff| = {:e} > atol {atol:e} + rtol {rtol:e} * |want|); ||diff||/||want|| = {rel:e}",
        got[worst],
        want[worst],
        (got[worst] - want[worst]).abs()
    );
}

/// Worst element-wise error and relative L2 error, for tests that report a measured bound.
pub fn errors(got: &[f32], want: &[f32]) -> (f32, f64) {
    let worst = got.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0.0f32, f32::max);
    let d: f64 = got.iter().zip(want).map(|(g, w)| ((g - w) as f64).powi(2)).sum();
    let r: f64 = want.iter().map(|w| (*w as f64).powi(2)).sum();
    (worst, (d / r).sqrt())
}
