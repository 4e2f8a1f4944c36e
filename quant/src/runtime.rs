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

fn pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let mut b = rayon::ThreadPoolBuilder::new().stack_size(256 << 20);
        if let Some(n) = std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
        {
            b = b.num_threads(n);
        }
        b.thread_name(|i| format!("qlora-{i}")).build().ok()
    })
    .as_ref()
}

/// The binary's allocator (`#[global_allocator]` in src/main.rs): glibc's malloc as [`init`]
/// configures it (one heap for every thread), except on a thread running inside
/// [`private_heap`], whose allocations come from mimalloc's heap of that thread. glibc's single
/// heap serializes every `malloc` on one lock: two threads tokenizing data (the tokenizers crate
/// allocates per word and per token) took longer than one (`perf`: `__libc_malloc` →
/// `__lll_lock_wake_private`), and glibc cannot give chosen threads heaps of their own once its
/// arena limit is set (the limit is fixed at the first thread's first allocation). A block is
/// freed, or grown, by the allocator that made it (`mi_is_in_heap_region`: a lookup in
/// mimalloc's segment map), whichever thread frees it; training's threads never allocate from
/// mimalloc.
#[derive(Debug)]
pub struct Allocator;

std::thread_local! {
    static PRIVATE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

// SAFETY: every block is allocated by exactly one of the two allocators and returned to it
// (mimalloc owns exactly the pointers in its segment map); both honour size and alignment.
unsafe impl std::alloc::GlobalAlloc for Allocator {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        if PRIVATE.with(std::cell::Cell::get) {
            // SAFETY: a valid layout (the caller's contract).
            unsafe { libmimalloc_sys::mi_malloc_aligned(l.size(), l.align()).cast() }
        } else {
            // SAFETY: as above.
            unsafe { std::alloc::System.alloc(l) }
        }
    }

    unsafe fn alloc_zeroed(&self, l: std::alloc::Layout) -> *mut u8 {
        if PRIVATE.with(std::cell::Cell::get) {
            // SAFETY: a valid layout (the caller's contract).
            unsafe { libmimalloc_sys::mi_zalloc_aligned(l.size(), l.align()).cast() }
        } else {
            // SAFETY: as above.
            unsafe { std::alloc::System.alloc_zeroed(l) }
        }
    }

    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        // SAFETY: `p` came from this allocator with `l` (the caller's contract), so from exactly
        // one of the two, which the segment map tells.
        unsafe {
            if libmimalloc_sys::mi_is_in_heap_region(p.cast()) {
                libmimalloc_sys::mi_free(p.cast())
            } else {
                std::alloc::System.dealloc(p, l)
            }
        }
    }

    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, size: usize) -> *mut u8 {
        // SAFETY: as in dealloc; the block stays with the allocator that made it.
        unsafe {
            if libmimalloc_sys::mi_is_in_heap_region(p.cast()) {
                libmimalloc_sys::mi_realloc_aligned(p.cast(), size, l.align()).cast()
            } else {
                std::alloc::System.realloc(p, l, size)
            }
        }
    }
}

/// Runs `f` with the calling thread's allocations taken from a heap of its own ([`Allocator`];
/// without it installed, just runs `f`): for threads a caller starts for allocation-heavy work
/// that is not a training step (tokenizing data), so that they do not queue on glibc's one lock.
pub fn private_heap<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            PRIVATE.with(|p| p.set(self.0));
        }
    }
    let _reset = Reset(PRIVATE.with(|p| p.replace(true)));
    f()
}

/// Runs `f` on a worker of the compute pool (rayon's, built here with large stacks: candle's
/// backward walks its graph recursively), so that every parallel op `f` starts is forked from a
/// pool thread, which takes a share of the work itself, rather than handed over from an outside
/// thread that sleeps until the pool is done: one wake-up per parallel op instead of two.
pub fn run<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match pool() {
        Some(pool) => pool.install(f),
        None => f(),
    }
}

/// Threads of the pool the calling thread's parallel ops run on (inside [`run`], the compute
/// pool: `RAYON_NUM_THREADS`, else one per logical CPU).
pub fn threads() -> usize {
    rayon::current_num_threads()
}
