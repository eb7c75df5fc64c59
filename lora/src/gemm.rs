//! Safe wrapper over `matrixmultiply::sgemm` for strided row-major views.

/// A read-only matrix view: element `(i, j)` is `data[offset + i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// A contiguous row-major `[rows, cols]` matrix.
    pub fn rm(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self { data, offset: 0, rows, cols, rs: cols, cs: 1 }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Self { rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs, ..self }
    }

    fn last(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            return 0;
        }
        self.offset + (self.rows - 1) * self.rs + (self.cols - 1) * self.cs
    }
}

/// `c = beta * c + alpha * a b` where `c` is the strided `[a.rows, b.cols]` view of `c_data` starting at
/// `c_offset` with strides `(rsc, csc)`. Panics on inconsistent shapes: callers validate user input first, so
/// a panic here is a bug in this crate.
pub(crate) fn sgemm(
    alpha: f32,
    a: View<'_>,
    b: View<'_>,
    beta: f32,
    c_data: &mut [f32],
    c_offset: usize,
    rsc: usize,
    csc: usize,
) {
    // SAFETY: `c_data` is a unique borrow of `c_data.len()` elements.
    unsafe { sgemm_ptr(alpha, a, b, beta, c_data.as_mut_ptr(), c_data.len(), c_offset, rsc, csc) }
}

/// [`sgemm`] into a raw buffer, for parallel tiles that write disjoint parts of one output.
///
/// # Safety
/// `c` must be valid for reads and writes of `c_len` elements for the duration of the call, and no other
/// thread may access the elements of the C view (`c_offset + i * rsc + j * csc`) meanwhile.
pub(crate) unsafe fn sgemm_ptr(
    alpha: f32,
    a: View<'_>,
    b: View<'_>,
    beta: f32,
    c: *mut f32,
    c_len: usize,
    c_offset: usize,
    rsc: usize,
    csc: usize,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "inner dimensions of a GEMM must agree");
    if m == 0 || n == 0 {
        return;
    }
    assert!(c_len > c_offset + (m - 1) * rsc + (n - 1) * csc, "C view out of bounds");
    if k == 0 {
        // matrixmultiply leaves C alone when k = 0; BLAS semantics scale it by beta.
        for i in 0..m {
            for j in 0..n {
                // SAFETY: in bounds by the assert above; exclusive per the function's contract.
                let p = unsafe { c.add(c_offset + i * rsc + j * csc) };
                unsafe { *p = if beta == 0.0 { 0.0 } else { *p * beta } };
            }
        }
        return;
    }
    assert!(a.data.len() > a.last(), "A view out of bounds");
    assert!(b.data.len() > b.last(), "B view out of bounds");
    // SAFETY: the asserts keep every element of A, B and C that sgemm touches inside its buffer; C's view has
    // distinct offsets for distinct (i, j) for the row- or column-major stride pairs every caller passes, and
    // the caller guarantees exclusive access to it.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.data.as_ptr().add(a.offset),
            a.rs as isize,
            a.cs as isize,
            b.data.as_ptr().add(b.offset),
            b.rs as isize,
            b.cs as isize,
            beta,
            c.add(c_offset),
            rsc as isize,
            csc as isize,
        );
    }
}
