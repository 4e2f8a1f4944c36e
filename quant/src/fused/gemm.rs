//! A gemm call on row-major f32 slices (or their transposes), for the CPU ops of this module.

/// A strided f32 matrix for gemm over a slice: element `(i, j)` at `p + i·rs + j·cs`, within
/// the slice's `len` values (checked by [`mm`] for the shape it is used with).
#[derive(Clone, Copy)]
pub(super) struct Mat {
    p: *const f32,
    len: usize,
    rs: usize,
    cs: usize,
}

impl Mat {
    /// Whether every element of a `rows × cols` view lies inside the slice.
    fn holds(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.len
    }
}

/// Row-major `[rows, cols]` (`t`: its transpose, `[cols, rows]`).
pub(super) fn rm(v: &[f32], cols: usize, t: bool) -> Mat {
    let (rs, cs) = if t { (1, cols) } else { (cols, 1) };
    Mat {
        p: v.as_ptr(),
        len: v.len(),
        rs,
        cs,
    }
}

/// Which threads run a product.
#[derive(Clone, Copy)]
pub(super) enum Threads {
    /// The rayon pool's, when there is enough work.
    Pool,
    /// The calling thread's only: for callers that already run one task per thread.
    Caller,
}

/// `dst[m, n] = (dst if acc) + beta · lhs[m, k] · rhs[k, n]`, dst row-major, on `threads`.
pub(super) fn mm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    acc: bool,
    lhs: Mat,
    rhs: Mat,
    beta: f32,
    threads: Threads,
) {
    let par = match threads {
        Threads::Pool if m * n * k >= 1 << 20 => {
            gemm::Parallelism::Rayon(rayon::current_num_threads())
        }
        _ => gemm::Parallelism::None,
    };
    assert!(
        dst.len() >= m * n && lhs.holds(m, k) && rhs.holds(k, n),
        "gemm operands too small for [{m}, {k}] · [{k}, {n}]"
    );
    // SAFETY: dst holds m × n (row stride n); lhs and rhs lie inside their slices (checked above),
    // which outlive the call.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            acc,
            lhs.p,
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.p,
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            par,
        )
    }
}
