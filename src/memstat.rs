//! What this process holds, as the operating system and the allocator report it: resident bytes
//! now and at the peak (`/proc/self/status`), and the heap in use (glibc's `mallinfo2`). `qlora
//! plan` measures the tokenizer's heap and the process's baseline with these, the trainer and
//! `data prepare` report their peaks.

/// Resident bytes of this process now (`VmRSS`), 0 where /proc is absent.
pub fn resident_bytes() -> u64 {
    proc_status_kb("VmRSS:") * 1024
}

/// Peak resident bytes of this process (`VmHWM`), 0 where /proc is absent.
pub fn peak_resident_bytes() -> u64 {
    proc_status_kb("VmHWM:") * 1024
}

fn proc_status_kb(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Bytes the heap hands out now (glibc's `mallinfo2`: arena and mmapped blocks in use); `None`
/// where the allocator cannot say.
pub fn heap_in_use() -> Option<u64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        let m = unsafe { libc::mallinfo2() };
        Some((m.uordblks + m.hblkhd) as u64)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}
