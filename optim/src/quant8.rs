//! bitsandbytes' blockwise dynamic 8-bit quantization, as used for the states of its 8-bit optimizers.
//!
//! A tensor is cut into blocks of [`BLOCK`] consecutive elements; each block keeps its absolute maximum
//! (f32) and one byte per element indexing a 256-entry *dynamic map* (values spread over seven decades, so
//! small and large magnitudes are both represented). `SIGNED_MAP` holds the first moment (index 127 is 0.0,
//! there is no -1.0), `UNSIGNED_MAP` the second moment (index 0 is 0.0).
//!
//! The maps are shipped as constants instead of being re-derived, because bitsandbytes builds them with a
//! float32 linspace and a float64 multiply whose rounding is easy to get wrong by one ulp. They were printed
//! from bitsandbytes 0.50.2 `create_dynamic_map` by `scripts/optim_fixtures.py --print-maps`, and a test checks
//! them bit for bit against the map stored in `fixtures/optim/blockwise8_bnb.safetensors`.

use std::sync::OnceLock;

use crate::{Error, Result};

/// Elements per absmax block of the 8-bit optimizer states (`BLOCKSIZE_2STATE` in bitsandbytes).
pub const BLOCK: usize = 256;

/// Which dynamic map a state uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DynamicMap {
    /// For values in [-1, 1] (first moment).
    Signed,
    /// For values in [0, 1] (second moment).
    Unsigned,
}

impl DynamicMap {
    /// The 256 code values, ascending.
    pub fn table(self) -> &'static [f32; 256] {
        match self {
            DynamicMap::Signed => &SIGNED_MAP,
            DynamicMap::Unsigned => &UNSIGNED_MAP,
        }
    }

    /// Index of the code nearest to `x` (already divided by the block absmax), exactly as the bitsandbytes
    /// kernel's binary search (`quantize_2D`) picks it.
    ///
    /// That search takes seven halving steps from pivot 127, so it always ends on an even pivot, and then
    /// compares `x` with the f32 midpoint `(code[p] + code[p±1]) * 0.5` to the neighbour on `x`'s side, ties
    /// staying on the pivot. Its result is therefore the nearest code with ties going to the even index (and
    /// index 0 for NaN). Walking seven dependent, unpredictable comparisons per value made it the bottleneck of
    /// the optimizer step, so this finds the same index from a lookup on the float's leading bits followed by
    /// at most a few midpoint comparisons; a test checks it against the kernel's search on every midpoint.
    #[inline]
    pub fn quantize(self, x: f32) -> u8 {
        if x.is_nan() {
            return 0;
        }
        let lut = self.lut();
        let mut i = lut.start[(order_key(x) >> LUT_SHIFT) as usize] as usize;
        while i < 255 && x > lut.mid[i] {
            i += 1;
        }
        if i < 255 && x == lut.mid[i] && i % 2 == 1 {
            i += 1;
        }
        i as u8
    }

    fn lut(self) -> &'static Lut {
        static SIGNED: OnceLock<Lut> = OnceLock::new();
        static UNSIGNED: OnceLock<Lut> = OnceLock::new();
        match self {
            DynamicMap::Signed => SIGNED.get_or_init(|| Lut::new(&SIGNED_MAP)),
            DynamicMap::Unsigned => UNSIGNED.get_or_init(|| Lut::new(&UNSIGNED_MAP)),
        }
    }
}

/// Bits of the order key kept by the lookup table (sign, exponent and 7 mantissa bits).
const LUT_SHIFT: u32 = 16;

/// Maps an f32 to a u32 with the same order (for non-NaN values).
#[inline]
fn order_key(x: f32) -> u32 {
    let b = x.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// Midpoints of a map and, for every order-key bucket, how many midpoints lie below the bucket's first value.
struct Lut {
    mid: [f32; 255],
    start: Vec<u8>,
}

impl Lut {
    fn new(code: &[f32; 256]) -> Self {
        let mut mid = [0f32; 255];
        for (i, m) in mid.iter_mut().enumerate() {
            *m = (code[i] + code[i + 1]) * 0.5;
        }
        let buckets = 1usize << (32 - LUT_SHIFT);
        let mut start = vec![0u8; buckets];
        let mut below = 0usize;
        for (bucket, s) in start.iter_mut().enumerate() {
            let first = (bucket as u32) << LUT_SHIFT;
            while below < 255 && order_key(mid[below]) < first {
                below += 1;
            }
            // A midpoint equal to the bucket's first value is not below it; 255 cannot occur as a start.
            *s = below.min(254) as u8;
        }
        Self { mid, start }
    }
}

/// Quantizes `x` blockwise: `absmax[b] = max |x|` over block `b` and `codes[i]` the nearest code to
/// `x[i] / absmax[b]` (bitsandbytes `quantize_blockwise(x, code, blocksize=256)`).
/// `codes` must have `x.len()` entries and `absmax` `ceil(x.len() / 256)`.
pub fn quantize_blockwise(x: &[f32], map: DynamicMap, codes: &mut [u8], absmax: &mut [f32]) -> Result<()> {
    check_lengths(x.len(), codes.len(), absmax.len())?;
    for ((xb, cb), am) in x.chunks(BLOCK).zip(codes.chunks_mut(BLOCK)).zip(absmax.iter_mut()) {
        *am = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (c, &v) in cb.iter_mut().zip(xb) {
            *c = map.quantize(v / *am);
        }
    }
    Ok(())
}

/// `out[i] = map[codes[i]] * absmax[i / 256]`.
pub fn dequantize_blockwise(codes: &[u8], absmax: &[f32], map: DynamicMap, out: &mut [f32]) -> Result<()> {
    check_lengths(out.len(), codes.len(), absmax.len())?;
    let table = map.table();
    for ((ob, cb), &am) in out.chunks_mut(BLOCK).zip(codes.chunks(BLOCK)).zip(absmax) {
        for (o, &c) in ob.iter_mut().zip(cb) {
            *o = table[c as usize] * am;
        }
    }
    Ok(())
}

fn check_lengths(n: usize, codes: usize, absmax: usize) -> Result<()> {
    if codes != n || absmax != n.div_ceil(BLOCK) {
        return Err(Error::Shape(format!(
            "blockwise 8-bit quantization of {n} elements needs {n} codes and {} absmax values, got {codes} and {absmax}",
            n.div_ceil(BLOCK)
        )));
    }
    Ok(())
}

#[rustfmt::skip]
/// bitsandbytes `create_dynamic_map(signed=True)`.
pub const SIGNED_MAP: [f32; 256] = [
    -9.9296874e-1, -9.789063e-1, -9.6484375e-1, -9.507812e-1, -9.3671876e-1, -9.2265624e-1, -9.085938e-1, -8.9453125e-1,
    -8.804687e-1, -8.6640626e-1, -8.5234374e-1, -8.382813e-1, -8.2421875e-1, -8.101562e-1, -7.9609376e-1, -7.8203124e-1,
    -7.679688e-1, -7.5390625e-1, -7.398437e-1, -7.2578126e-1, -7.117188e-1, -6.976563e-1, -6.8359375e-1, -6.695312e-1,
    -6.5546876e-1, -6.414063e-1, -6.273438e-1, -6.1328125e-1, -5.992187e-1, -5.8515626e-1, -5.710938e-1, -5.570313e-1,
    -5.4296875e-1, -5.289062e-1, -5.148437e-1, -5.0078124e-1, -4.867187e-1, -4.7265625e-1, -4.5859373e-1, -4.4453126e-1,
    -4.3046874e-1, -4.1640624e-1, -4.0234375e-1, -3.8828123e-1, -3.7421876e-1, -3.6015624e-1, -3.4609374e-1, -3.3203125e-1,
    -3.1796873e-1, -3.0390626e-1, -2.8984374e-1, -2.7578127e-1, -2.6171875e-1, -2.4765624e-1, -2.3359375e-1, -2.1953125e-1,
    -2.0546874e-1, -1.9140625e-1, -1.7734376e-1, -1.6328125e-1, -1.4921875e-1, -1.3515624e-1, -1.2109375e-1, -1.07031256e-1,
    -9.859375e-2, -9.578126e-2, -9.2968754e-2, -9.015625e-2, -8.734375e-2, -8.453125e-2, -8.171876e-2, -7.890625e-2,
    -7.609375e-2, -7.328125e-2, -7.0468746e-2, -6.7656256e-2, -6.484375e-2, -6.203125e-2, -5.9218753e-2, -5.640625e-2,
    -5.359375e-2, -5.078125e-2, -4.796875e-2, -4.515625e-2, -4.2343747e-2, -3.953125e-2, -3.6718752e-2, -3.390625e-2,
    -3.109375e-2, -2.8281251e-2, -2.546875e-2, -2.265625e-2, -1.9843752e-2, -1.703125e-2, -1.421875e-2, -1.140625e-2,
    -9.71875e-3, -9.156249e-3, -8.59375e-3, -8.03125e-3, -7.46875e-3, -6.90625e-3, -6.34375e-3, -5.78125e-3,
    -5.2187503e-3, -4.6562497e-3, -4.09375e-3, -3.5312497e-3, -2.96875e-3, -2.40625e-3, -1.84375e-3, -1.2812499e-3,
    -9.437501e-4, -8.3125e-4, -7.1875006e-4, -6.062501e-4, -4.9375003e-4, -3.8125002e-4, -2.6875004e-4, -1.5625001e-4,
    -8.875e-5, -6.625e-5, -4.375e-5, -2.1249998e-5, -7.75e-6, -3.2500002e-6, -5.5000004e-7, 0.0,
    5.5000004e-7, 3.2500002e-6, 7.75e-6, 2.1249998e-5, 4.375e-5, 6.625e-5, 8.875e-5, 1.5625001e-4,
    2.6875004e-4, 3.8125002e-4, 4.9375003e-4, 6.062501e-4, 7.1875006e-4, 8.3125e-4, 9.437501e-4, 1.2812499e-3,
    1.84375e-3, 2.40625e-3, 2.96875e-3, 3.5312497e-3, 4.09375e-3, 4.6562497e-3, 5.2187503e-3, 5.78125e-3,
    6.34375e-3, 6.90625e-3, 7.46875e-3, 8.03125e-3, 8.59375e-3, 9.156249e-3, 9.71875e-3, 1.140625e-2,
    1.421875e-2, 1.703125e-2, 1.9843752e-2, 2.265625e-2, 2.546875e-2, 2.8281251e-2, 3.109375e-2, 3.390625e-2,
    3.6718752e-2, 3.953125e-2, 4.2343747e-2, 4.515625e-2, 4.796875e-2, 5.078125e-2, 5.359375e-2, 5.640625e-2,
    5.9218753e-2, 6.203125e-2, 6.484375e-2, 6.7656256e-2, 7.0468746e-2, 7.328125e-2, 7.609375e-2, 7.890625e-2,
    8.171876e-2, 8.453125e-2, 8.734375e-2, 9.015625e-2, 9.2968754e-2, 9.578126e-2, 9.859375e-2, 1.07031256e-1,
    1.2109375e-1, 1.3515624e-1, 1.4921875e-1, 1.6328125e-1, 1.7734376e-1, 1.9140625e-1, 2.0546874e-1, 2.1953125e-1,
    2.3359375e-1, 2.4765624e-1, 2.6171875e-1, 2.7578127e-1, 2.8984374e-1, 3.0390626e-1, 3.1796873e-1, 3.3203125e-1,
    3.4609374e-1, 3.6015624e-1, 3.7421876e-1, 3.8828123e-1, 4.0234375e-1, 4.1640624e-1, 4.3046874e-1, 4.4453126e-1,
    4.5859373e-1, 4.7265625e-1, 4.867187e-1, 5.0078124e-1, 5.148437e-1, 5.289062e-1, 5.4296875e-1, 5.570313e-1,
    5.710938e-1, 5.8515626e-1, 5.992187e-1, 6.1328125e-1, 6.273438e-1, 6.414063e-1, 6.5546876e-1, 6.695312e-1,
    6.8359375e-1, 6.976563e-1, 7.117188e-1, 7.2578126e-1, 7.398437e-1, 7.5390625e-1, 7.679688e-1, 7.8203124e-1,
    7.9609376e-1, 8.101562e-1, 8.2421875e-1, 8.382813e-1, 8.5234374e-1, 8.6640626e-1, 8.804687e-1, 8.9453125e-1,
    9.085938e-1, 9.2265624e-1, 9.3671876e-1, 9.507812e-1, 9.6484375e-1, 9.789063e-1, 9.9296874e-1, 1.0,
];
/// bitsandbytes `create_dynamic_map(signed=False)`.
#[rustfmt::skip]
pub const UNSIGNED_MAP: [f32; 256] = [
    0.0, 3.2500003e-7, 7.75e-7, 2.1249998e-6, 4.3749997e-6, 6.625e-6, 8.874999e-6, 1.5624999e-5,
    2.6875001e-5, 3.8125e-5, 4.9374998e-5, 6.0625003e-5, 7.1875e-5, 8.312499e-5, 9.4375e-5, 1.28125e-4,
    1.84375e-4, 2.4062501e-4, 2.9687502e-4, 3.5312498e-4, 4.0937503e-4, 4.6562502e-4, 5.2187504e-4, 5.78125e-4,
    6.34375e-4, 6.9062505e-4, 7.46875e-4, 8.031251e-4, 8.5937505e-4, 9.15625e-4, 9.7187504e-4, 1.140625e-3,
    1.421875e-3, 1.703125e-3, 1.984375e-3, 2.265625e-3, 2.5468748e-3, 2.828125e-3, 3.1093748e-3, 3.3906251e-3,
    3.671875e-3, 3.953125e-3, 4.2343745e-3, 4.515625e-3, 4.7968747e-3, 5.078125e-3, 5.359375e-3, 5.6406246e-3,
    5.921875e-3, 6.2031248e-3, 6.484375e-3, 6.7656254e-3, 7.0468746e-3, 7.328125e-3, 7.6093744e-3, 7.890625e-3,
    8.171875e-3, 8.453124e-3, 8.734375e-3, 9.015624e-3, 9.2968745e-3, 9.578126e-3, 9.859375e-3, 1.0703126e-2,
    1.2109376e-2, 1.3515624e-2, 1.4921876e-2, 1.6328124e-2, 1.7734377e-2, 1.9140625e-2, 2.0546874e-2, 2.1953126e-2,
    2.3359375e-2, 2.4765624e-2, 2.6171876e-2, 2.7578129e-2, 2.8984373e-2, 3.0390626e-2, 3.1796873e-2, 3.3203125e-2,
    3.4609374e-2, 3.6015626e-2, 3.742188e-2, 3.8828123e-2, 4.0234376e-2, 4.1640624e-2, 4.3046873e-2, 4.4453125e-2,
    4.5859374e-2, 4.7265626e-2, 4.867187e-2, 5.0078124e-2, 5.1484372e-2, 5.2890625e-2, 5.4296877e-2, 5.570313e-2,
    5.7109382e-2, 5.8515627e-2, 5.9921872e-2, 6.1328124e-2, 6.273438e-2, 6.414063e-2, 6.554688e-2, 6.695312e-2,
    6.8359375e-2, 6.976563e-2, 7.117188e-2, 7.2578125e-2, 7.398438e-2, 7.539063e-2, 7.679688e-2, 7.820313e-2,
    7.960938e-2, 8.1015624e-2, 8.242188e-2, 8.382813e-2, 8.5234374e-2, 8.6640626e-2, 8.804687e-2, 8.945312e-2,
    9.0859376e-2, 9.226563e-2, 9.367188e-2, 9.5078126e-2, 9.648438e-2, 9.789063e-2, 9.9296875e-2, 1.03515625e-1,
    1.1054687e-1, 1.1757813e-1, 1.2460937e-1, 1.3164061e-1, 1.3867188e-1, 1.4570314e-1, 1.5273437e-1, 1.5976563e-1,
    1.6679686e-1, 1.7382812e-1, 1.8085939e-1, 1.8789062e-1, 1.9492188e-1, 2.0195311e-1, 2.0898438e-1, 2.1601564e-1,
    2.2304687e-1, 2.3007813e-1, 2.3710936e-1, 2.4414062e-1, 2.5117186e-1, 2.5820312e-1, 2.6523438e-1, 2.722656e-1,
    2.7929688e-1, 2.8632814e-1, 2.9335937e-1, 3.003906e-1, 3.0742186e-1, 3.1445312e-1, 3.214844e-1, 3.2851562e-1,
    3.3554685e-1, 3.425781e-1, 3.4960938e-1, 3.5664064e-1, 3.6367187e-1, 3.707031e-1, 3.7773436e-1, 3.8476562e-1,
    3.917969e-1, 3.9882812e-1, 4.0585935e-1, 4.128906e-1, 4.1992188e-1, 4.2695314e-1, 4.3398437e-1, 4.410156e-1,
    4.4804686e-1, 4.5507812e-1, 4.621094e-1, 4.6914062e-1, 4.7617185e-1, 4.832031e-1, 4.9023438e-1, 4.972656e-1,
    5.042969e-1, 5.113281e-1, 5.1835936e-1, 5.253906e-1, 5.324218e-1, 5.3945315e-1, 5.4648435e-1, 5.535157e-1,
    5.605469e-1, 5.6757814e-1, 5.746094e-1, 5.816406e-1, 5.886719e-1, 5.957031e-1, 6.027344e-1, 6.0976565e-1,
    6.1679685e-1, 6.238282e-1, 6.308594e-1, 6.3789064e-1, 6.449219e-1, 6.519531e-1, 6.589844e-1, 6.660156e-1,
    6.730469e-1, 6.8007815e-1, 6.8710935e-1, 6.941407e-1, 7.011719e-1, 7.0820314e-1, 7.152344e-1, 7.222656e-1,
    7.292969e-1, 7.363281e-1, 7.433594e-1, 7.5039065e-1, 7.5742185e-1, 7.644532e-1, 7.714844e-1, 7.785156e-1,
    7.855469e-1, 7.925781e-1, 7.996094e-1, 8.066406e-1, 8.136718e-1, 8.2070315e-1, 8.2773435e-1, 8.347657e-1,
    8.417969e-1, 8.488281e-1, 8.558594e-1, 8.628906e-1, 8.699219e-1, 8.769531e-1, 8.839843e-1, 8.9101565e-1,
    8.9804685e-1, 9.050782e-1, 9.121094e-1, 9.191406e-1, 9.261719e-1, 9.332031e-1, 9.402344e-1, 9.472656e-1,
    9.542968e-1, 9.6132815e-1, 9.6835935e-1, 9.753907e-1, 9.824219e-1, 9.894531e-1, 9.964844e-1, 1.0,
];

#[cfg(test)]
mod tests {
    use super::*;

    /// The bitsandbytes kernel's search (`quantize_2D<SIGNED>` in csrc/cuda/optimizers.cu), step by step.
    fn kernel_search(map: DynamicMap, x: f32) -> u8 {
        let code = map.table();
        let (mut pivot, mut upper_pivot, mut lower_pivot) = (127usize, 255usize, 0usize);
        let mut lower = if map == DynamicMap::Signed { -1.0f32 } else { 0.0 };
        let mut upper = 1.0f32;
        let mut val = code[127];
        let mut step = 64;
        while step > 0 {
            if x > val {
                lower_pivot = pivot;
                lower = val;
                pivot += step;
            } else {
                upper_pivot = pivot;
                upper = val;
                pivot -= step;
            }
            val = code[pivot];
            step >>= 1;
        }
        let index = if x > val {
            if x > (upper + val) * 0.5 {
                upper_pivot
            } else {
                pivot
            }
        } else if x < (lower + val) * 0.5 {
            lower_pivot
        } else {
            pivot
        };
        index as u8
    }

    #[test]
    fn lookup_equals_the_kernel_search_on_codes_midpoints_and_their_neighbours() {
        for map in [DynamicMap::Signed, DynamicMap::Unsigned] {
            let code = map.table();
            let mut probes = vec![-1.0f32, 0.0, -0.0, 1.0, f32::NAN, f32::MIN_POSITIVE, -f32::MIN_POSITIVE];
            for i in 0..256 {
                probes.push(code[i]);
                if i < 255 {
                    probes.push((code[i] + code[i + 1]) * 0.5);
                }
            }
            let neighbours: Vec<f32> = probes.iter().flat_map(|&p| [p.next_down(), p.next_up()]).collect();
            probes.extend(neighbours);
            for x in probes {
                assert_eq!(map.quantize(x), kernel_search(map, x), "{map:?} x = {x:e}");
            }
        }
    }

    #[test]
    fn lookup_equals_the_kernel_search_on_a_million_values() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..1_000_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Uniform in [-1, 1] and log-uniform magnitudes down to 1e-9, as normalised moments are.
            let u = (state >> 40) as f32 / (1u64 << 24) as f32;
            let mag = 10f32.powf(-9.0 * ((state & 0xffff) as f32 / 65535.0));
            for x in [2.0 * u - 1.0, mag, -mag, u] {
                assert_eq!(DynamicMap::Signed.quantize(x), kernel_search(DynamicMap::Signed, x), "x = {x:e}");
            }
            for x in [u, mag] {
                assert_eq!(DynamicMap::Unsigned.quantize(x), kernel_search(DynamicMap::Unsigned, x), "x = {x:e}");
            }
        }
    }
}
