//! The CPU runtime of a training process: one thread pool, no spinning, no page churn.
//!
//! Every parallel CPU op of a step runs on one rayon pool ([`run`]): gemm (candle's matmul asks it for
//! `Parallelism::Rayon`), the NF4 linear's tiles, the fused ops' rows and the LoRA products
//! ([`crate::fused`], [`crate::op`]). candle 0.11 also keeps a second pool of its own for its
//! elementwise ops (its "barrier pool", `CANDLE_NUM_THREADS − 1` threads), whose idle workers spin
//! ~25 000 pause instructions (about a millisecond) after every op before parking: on a 2-core
//! machine that spinning took a core from the matmuls (10 % of a training step's cycles in
//! `perf`). [`init`] sets `CANDLE_NUM_THREADS=1` unless the user set it, so that pool has no
//! threads and candle's remaining elementwise ops (residual adds, gradient accumulation) run on
//! the calling thread, between the parallel ops rather than against them.
//!
//! It also keeps freed heap memory for reuse (glibc: no trimming below 1 GiB, and allocations
//! below 32 MiB from the heap rather than fresh `mmap`s), so a step's activation-sized buffers
//! stop being faulted in and zeroed by the kernel page by page, step after step; and it keeps one
//! heap for every thread (glibc's `M_ARENA_MAX = 1`, unless `MALLOC_ARENA_MAX` is set): with an
//! arena per pool thread, memory one thread freed could not serve another's next buffer, and the
//! peak resident set depended on which thread allocated what (150 MiB above the heap's peak at
//! 2048 tokens, against 50 MiB with one arena; the step time did not change on 2 cores), which no
//! memory plan can predict.

/// Configures the process for CPU training; call it first thing in `main`, then run the work
/// through [`run`].
///
/// # Safety
/// No other thread may be running (it sets an environment variable, which is unsound while
/// another thread reads the environment).
pub unsafe fn init() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // candle asks for its thread count on every matmul and, without this variable, counts
        // physical cores by parsing /proc/cpuinfo each time (2 % of a step in `perf`); set, it
        // reads the number, and its matmuls ask gemm for as many threads as the pool has.
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: the caller guarantees this thread is the only one.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: the caller guarantees this thread is the only one.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; no allocation is in flight on another thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

/// Runs `f` on a worker of the compute pool (rayon's, built here with large stacks: candle's
/// backward walks its graph recursively), so that every parallel op `f` starts is forked from a
/// pool thread, which takes a share of the work itself, rather than handed over from an outside
/// thread that sleeps until the pool is done: one wake-up per parallel op instead of two.
pub fn run<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    let pool = POOL.get_or_init(|| {
        let mut b = rayon::ThreadPoolBuilder::new().stack_size(256 << 20);
        if let Some(n) = std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
        {
            b = b.num_threads(n);
        }
        b.thread_name(|i| format!("qlora-{i}")).build().ok()
    });
    match pool {
        Some(pool) => pool.install(f),
        None => f(),
    }
}

/// Threads of the pool the calling thread's parallel ops run on (inside [`run`], the compute
/// pool: `RAYON_NUM_THREADS`, else one per logical CPU).
pub fn threads() -> usize {
    rayon::current_num_threads()
}
