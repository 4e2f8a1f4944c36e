//! The CPU class the process runs its SIMD paths for, and a way to force the AVX2 class on an
//! AVX-512 machine (`QLORA_CPU=avx2`), so both classes can be measured on one host.
//!
//! Every SIMD dispatch in the process (ours, gemm's, `multiversion`'s, std's
//! `is_x86_feature_detected!`) asks the `cpuid` instruction. [`force_from_env`] makes `cpuid` trap
//! (Linux's `ARCH_SET_CPUID`, the CPU's CPUID faulting: Intel since Ivy Bridge, and the flag
//! `cpuid_fault` in /proc/cpuinfo) and answers it in a SIGSEGV handler with the real values less
//! the AVX-512 and AMX bits, as an AVX2-only CPU (Zen 3, most laptops) answers. The setting is
//! inherited by every thread started afterwards, so it must run first thing in `main`, before
//! any thread and any feature query. Other faults go on to the handler that was there before.

/// Names the class of the running CPU as the process sees it: `avx512` (AVX-512F, BW, VL),
/// `avx2` (AVX2 and FMA), or `baseline`.
pub fn class() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
        {
            return "avx512";
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return "avx2";
        }
    }
    "baseline"
}

/// Reads `QLORA_CPU` (`native`, the default, or `avx2`) and, for `avx2` on a CPU with AVX-512,
/// hides AVX-512 and AMX from the process ([module doc](self)). Returns what was done, for a log
/// line; an error says why it cannot be done here.
///
/// # Safety
/// Call first thing in `main`: no other thread may exist, and no CPU feature may have been
/// queried yet (the answers are cached).
pub unsafe fn force_from_env() -> Result<Option<String>, String> {
    match std::env::var("QLORA_CPU").ok().as_deref() {
        None | Some("") | Some("native") => Ok(None),
        Some("avx2") => {
            // SAFETY: the caller's contract.
            unsafe { hide_avx512() }
        }
        Some(other) => Err(format!(
            "QLORA_CPU={other}: use native (the default) or avx2 (run the AVX2 paths on an AVX-512 CPU)"
        )),
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod trap {
    use std::sync::atomic::{AtomicPtr, Ordering};

    const ARCH_SET_CPUID: libc::c_int = 0x1012;

    /// The SIGSEGV action before ours.
    static PREVIOUS: AtomicPtr<libc::sigaction> = AtomicPtr::new(std::ptr::null_mut());

    fn set_cpuid(enabled: bool) -> bool {
        // SAFETY: a plain syscall on the calling thread.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_SET_CPUID,
                libc::c_ulong::from(enabled),
            ) == 0
        }
    }

    /// The real `cpuid` answer for `leaf`/`sub` with AVX-512 and AMX cleared.
    pub fn masked(leaf: u32, sub: u32) -> [u32; 4] {
        let r = std::arch::x86_64::__cpuid_count(leaf, sub);
        let (mut a, mut b, mut c, mut d) = (r.eax, r.ebx, r.ecx, r.edx);
        if leaf == 7 && sub == 0 {
            // EBX: AVX512F 16, DQ 17, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31.
            b &= !(1 << 16 | 1 << 17 | 1 << 21 | 1 << 26 | 1 << 27 | 1 << 28 | 1 << 30 | 1 << 31);
            // ECX: VBMI 1, VBMI2 6, VNNI 11, BITALG 12, VPOPCNTDQ 14.
            c &= !(1 << 1 | 1 << 6 | 1 << 11 | 1 << 12 | 1 << 14);
            // EDX: 4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8, AMX-BF16 22, AVX512-FP16 23, AMX-TILE 24,
            // AMX-INT8 25.
            d &= !(1 << 2 | 1 << 3 | 1 << 8 | 1 << 22 | 1 << 23 | 1 << 24 | 1 << 25);
        }
        if leaf == 7 && sub == 1 {
            // EAX: AVX512-BF16 5.
            a &= !(1 << 5);
        }
        [a, b, c, d]
    }

    extern "C" fn on_segv(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
        // SAFETY: the kernel hands a valid ucontext to an SA_SIGINFO handler; the instruction
        // pointer it holds points at mapped code (the faulting instruction).
        unsafe {
            let uc = &mut *(ctx as *mut libc::ucontext_t);
            let g = &mut uc.uc_mcontext.gregs;
            let rip = g[libc::REG_RIP as usize] as *const u8;
            if !rip.is_null() && *rip == 0x0f && *rip.add(1) == 0xa2 && set_cpuid(true) {
                let r = masked(
                    g[libc::REG_RAX as usize] as u32,
                    g[libc::REG_RCX as usize] as u32,
                );
                set_cpuid(false);
                g[libc::REG_RAX as usize] = i64::from(r[0]);
                g[libc::REG_RBX as usize] = i64::from(r[1]);
                g[libc::REG_RCX as usize] = i64::from(r[2]);
                g[libc::REG_RDX as usize] = i64::from(r[3]);
                g[libc::REG_RIP as usize] += 2;
                return;
            }
            // Not ours: the previous action, as if ours were not there.
            let prev = PREVIOUS.load(Ordering::SeqCst);
            if !prev.is_null() {
                let p = &*prev;
                if p.sa_flags & libc::SA_SIGINFO != 0 && p.sa_sigaction > 1 {
                    let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                        std::mem::transmute(p.sa_sigaction);
                    return f(sig, info, ctx);
                }
                // Default or ignore: put it back; the instruction faults again and it applies.
                libc::sigaction(sig, prev, std::ptr::null_mut());
            }
        }
    }

    /// Installs the handler, then makes `cpuid` trap on this thread and every later one.
    pub unsafe fn install() -> Result<(), String> {
        // SAFETY: sigaction with valid pointers; the previous action is leaked on purpose (the
        // handler reads it for the life of the process).
        unsafe {
            let prev: *mut libc::sigaction = Box::into_raw(Box::new(std::mem::zeroed()));
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_segv as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut act.sa_mask);
            if libc::sigaction(libc::SIGSEGV, &act, prev) != 0 {
                return Err("cannot install a SIGSEGV handler".into());
            }
            PREVIOUS.store(prev, Ordering::SeqCst);
        }
        if !set_cpuid(false) {
            return Err(
                "QLORA_CPU=avx2 needs CPUID faulting, which this CPU or kernel does not offer (Intel CPUs since Ivy Bridge; the flag cpuid_fault in /proc/cpuinfo); run on an AVX2-only machine instead"
                    .into(),
            );
        }
        Ok(())
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
unsafe fn hide_avx512() -> Result<Option<String>, String> {
    let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
    if leaf7.ebx & (1 << 16) == 0 {
        return Ok(Some(
            "QLORA_CPU=avx2: this CPU has no AVX-512 to hide; running as it is".into(),
        ));
    }
    // SAFETY: the caller's contract (first thing in main).
    unsafe { trap::install()? };
    if std::arch::is_x86_feature_detected!("avx512f")
        || !std::arch::is_x86_feature_detected!("avx2")
    {
        return Err("QLORA_CPU=avx2: the CPU features did not change (asked too late?)".into());
    }
    Ok(Some(
        "QLORA_CPU=avx2: AVX-512 and AMX hidden from this process (cpuid traps and is answered without them)"
            .into(),
    ))
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
unsafe fn hide_avx512() -> Result<Option<String>, String> {
    Err("QLORA_CPU=avx2 works on x86-64 Linux only".into())
}

#[cfg(all(test, target_arch = "x86_64", target_os = "linux"))]
mod tests {
    #[test]
    fn the_mask_clears_avx512_and_amx_and_keeps_avx2() {
        let real = std::arch::x86_64::__cpuid_count(7, 0);
        let [_, b, c, d] = super::trap::masked(7, 0);
        assert_eq!(b & (1 << 16 | 1 << 30 | 1 << 31), 0);
        assert_eq!(c & (1 << 11), 0);
        assert_eq!(d & (1 << 24), 0);
        // AVX2 (EBX bit 5), BMI1/2 (3, 8) stay as the CPU has them.
        assert_eq!(
            b & (1 << 5 | 1 << 3 | 1 << 8),
            real.ebx & (1 << 5 | 1 << 3 | 1 << 8)
        );
        // Other leaves are untouched.
        let one = std::arch::x86_64::__cpuid_count(1, 0);
        assert_eq!(
            super::trap::masked(1, 0),
            [one.eax, one.ebx, one.ecx, one.edx]
        );
    }
}
