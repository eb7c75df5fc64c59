//! Row-major f32 matrix products on the CPU (matrixmultiply's sgemm).

/// `c[m, n] = beta * c + a[m, k] · b[k, n]`, or with `b_t`, `a[m, k] · b[n, k]ᵀ`.
pub fn matmul(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize, b_t: bool, beta: f32) {
    assert_eq!(a.len(), m * k, "matmul: a is not [{m}, {k}]");
    assert_eq!(b.len(), k * n, "matmul: b is not [{k}, {n}] (or transposed)");
    assert_eq!(c.len(), m * n, "matmul: c is not [{m}, {n}]");
    if m == 0 || n == 0 {
        return;
    }
    let (rsb, csb) = if b_t { (1, k as isize) } else { (n as isize, 1) };
    // SAFETY: the asserts above bound every access: a is m×k with row stride k, b is k×n with the
    // strides chosen for its layout, c is m×n with row stride n.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            rsb,
            csb,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// `c[m, n] = beta * c + a[k, m]ᵀ · b[k, n]` (weight gradients: `dW = dyᵀ · x`).
pub fn matmul_at(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize, beta: f32) {
    assert_eq!(a.len(), k * m, "matmul_at: a is not [{k}, {m}]");
    assert_eq!(b.len(), k * n, "matmul_at: b is not [{k}, {n}]");
    assert_eq!(c.len(), m * n, "matmul_at: c is not [{m}, {n}]");
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: as in `matmul`; a is read transposed through its strides (row stride 1, column stride m).
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            1,
            m as isize,
            b.as_ptr(),
            n as isize,
            1,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// General strided product `c = beta * c + a · b` with `a [m, k]`, `b [k, n]`, `c [m, n]` given as
/// slices plus (row, column) strides; the asserts check that every addressed element is in bounds.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_strided(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    beta: f32,
    c: &mut [f32],
    rsc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols.max(1) - 1) * cs;
    if k > 0 {
        assert!(last(m, k, rsa, csa) < a.len(), "sgemm_strided: a out of bounds");
        assert!(last(k, n, rsb, csb) < b.len(), "sgemm_strided: b out of bounds");
    }
    assert!(last(m, n, rsc, 1) < c.len(), "sgemm_strided: c out of bounds");
    // SAFETY: the asserts above bound the largest offset addressed in a, b and c.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            beta,
            c.as_mut_ptr(),
            rsc as isize,
            1,
        );
    }
}
