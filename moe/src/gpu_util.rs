//! Shape checks shared by the launchers.

pub(crate) fn shape_err(what: String) -> oxtune_kernels::Error {
    oxtune_kernels::Error::Shape(what)
}

/// `Error::Shape("<op>: <what> has N elements, expected M")` unless `got == want`.
pub(crate) fn check_len(op: &str, what: &str, got: usize, want: usize) -> oxtune_kernels::Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(shape_err(format!("{op}: {what} has {got} elements, expected {want}")))
    }
}

/// `n` as the `unsigned int` a kernel takes, or a shape error naming it.
pub(crate) fn to_u32(op: &str, what: &str, n: usize) -> oxtune_kernels::Result<u32> {
    u32::try_from(n).map_err(|_| shape_err(format!("{op}: {what} = {n} does not fit the kernel's 32-bit index")))
}
