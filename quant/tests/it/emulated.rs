//! The kernel emulation harness itself (feature `emulate`; quant/emu), through its self-test
//! kernels (quant/emu/selftest.cu): its bf16/f16 conversions against the half crate, warp
//! shuffles, votes and block reductions against their definitions, and the faults it must report
//! (naming the kernel and the block) instead of hanging or passing: a `__syncthreads` in divergent
//! code, a thread that exits before a barrier, a shuffle naming an exited lane, a spin loop (the
//! barrier times out), a read of shared memory no thread wrote (poisoned), a write past a buffer
//! (AddressSanitizer). The kernels of quant/kernels run through the per-device tests
//! (devices.rs, fused.rs, dropout.rs) in this build.

use qlora_quant::emu::{self, Arg, bytes_of, elems_of};
use qlora_quant::launch::LaunchDims;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn dims(blocks: u32, threads: u32) -> LaunchDims {
    LaunchDims {
        grid: (blocks, 1, 1),
        block: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn out_f32(n: usize) -> Arg {
    Arg::Out { n_bytes: 4 * n }
}

/// Every sign and exponent, with mantissas at, around and between the rounding ties of bf16
/// (16 dropped bits) and f16 (13 dropped bits, more for its subnormals), plus the specials.
fn conversion_inputs() -> Vec<f32> {
    let mantissas = [
        0u32, 1, 0x7fffff, 0x400000, 0x1000, 0x0fff, 0x1001, 0x3000, 0x2000, 0x8000, 0x7fff,
        0x8001, 0x18000, 0x10000, 0x400, 0x200, 0x201, 0x1ff, 0x12345, 0x6789a, 0x7fe000, 0x7ff000,
        0x7fefff, 0x7ff001, 0x555555, 0x2aaaaa,
    ];
    let mut v = Vec::new();
    for sign in [0u32, 1] {
        for exp in 0u32..=255 {
            for &m in &mantissas {
                v.push(f32::from_bits(sign << 31 | exp << 23 | m));
            }
        }
    }
    v.extend([
        65504.0,
        65519.99,
        65520.0,
        65536.0,
        5.96e-8,
        2.98e-8,
        2.9802326e-8,
        1e-38,
    ]);
    v
}

#[test]
fn conversions_round_as_the_half_crate_and_widen_exactly() {
    let x = conversion_inputs();
    let n = x.len();
    let outs = emu::launch(
        "emu_selftest_convert",
        qlora_quant::launch::elems(n).unwrap(),
        &[
            Arg::In {
                bytes: bytes_of(&x),
                offset: 0,
            },
            Arg::Out { n_bytes: 4 * n },
            out_f32(2 * n),
            Arg::U64(n as u64),
        ],
    )
    .unwrap();
    let bits: Vec<u32> = elems_of::<u32>(&outs[0]);
    let back: Vec<f32> = elems_of(&outs[1]);
    for (i, &v) in x.iter().enumerate() {
        let (b, h) = ((bits[i] & 0xffff) as u16, (bits[i] >> 16) as u16);
        if v.is_nan() {
            // CUDA's canonical NaN; the half crate keeps the payload.
            assert_eq!((b, h), (0x7fff, 0x7fff), "NaN {:#x}", v.to_bits());
            continue;
        }
        let want_b = half::bf16::from_f32(v);
        let want_h = half::f16::from_f32(v);
        assert_eq!(b, want_b.to_bits(), "bf16 of {v:e} ({:#010x})", v.to_bits());
        assert_eq!(h, want_h.to_bits(), "f16 of {v:e} ({:#010x})", v.to_bits());
        assert_eq!(
            back[2 * i].to_bits(),
            want_b.to_f32().to_bits(),
            "bf16 -> f32 of {v:e}"
        );
        assert_eq!(
            back[2 * i + 1].to_bits(),
            want_h.to_f32().to_bits(),
            "f16 -> f32 of {v:e}"
        );
    }
}

#[test]
fn warp_shuffles_votes_and_block_sums_follow_their_definitions() {
    let outs = emu::launch("emu_selftest_warp", dims(1, 64), &[out_f32(64 * 6)]).unwrap();
    let v: Vec<f32> = elems_of(&outs[0]);
    for t in 0..64usize {
        let (lane, warp0) = (t % 32, t - t % 32);
        let got = &v[6 * t..6 * t + 6];
        let down = if lane < 31 { t + 1 } else { t };
        let up = if lane > 0 { t - 1 } else { t };
        let want = [
            (t ^ 1) as f32,
            warp0 as f32,
            down as f32,
            up as f32,
            0xAAAA_AAAAu32 as f32,
            (0..64).sum::<usize>() as f32,
        ];
        assert_eq!(got, want, "thread {t}");
    }
}

/// Runs `kernel` on 2 blocks of 64 threads, expecting the harness to fail with all of `want` in
/// its message, well within the time a hang would take.
fn assert_reported(kernel: &str, want: &[&str]) {
    let t0 = Instant::now();
    let err = emu::launch(kernel, dims(2, 64), &[out_f32(64)])
        .unwrap_err()
        .to_string();
    for w in want {
        assert!(err.contains(w), "{kernel}: {w:?} missing from:\n{err}");
    }
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "{kernel}: took {:?}",
        t0.elapsed()
    );
}

#[test]
fn a_divergent_syncthreads_fails_naming_the_kernel_and_block() {
    assert_reported(
        "emu_selftest_divergent_sync",
        &[
            "kernel emu_selftest_divergent_sync, block (0, 0, 0)",
            "divergent __syncthreads",
            "threads 0-31 wait at __syncthreads (",
            "threads 32-63 wait at __syncthreads (",
        ],
    );
    assert_reported(
        "emu_selftest_exit_before_sync",
        &[
            "kernel emu_selftest_exit_before_sync, block (0, 0, 0)",
            "some threads exited",
        ],
    );
    assert_reported(
        "emu_selftest_shuffle_exited_lane",
        &[
            "kernel emu_selftest_shuffle_exited_lane, block (0, 0, 0)",
            "a warp operation's mask names an exited lane",
            "wait at __shfl_xor_sync (mask 0xffffffff)",
        ],
    );
}

#[test]
fn a_spinning_thread_times_the_barrier_out() {
    // Its own harness process, with a 1 s timeout (QLORA_EMU_TIMEOUT_S, read at each launch).
    let request = emu::encode(
        "emu_selftest_spin",
        dims(3, 32),
        &[Arg::In {
            bytes: vec![0; 4],
            offset: 0,
        }],
    )
    .unwrap();
    let mut child = Command::new(emu::runner_path())
        .env("QLORA_EMU_TIMEOUT_S", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&request).unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the harness hung instead of timing out");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success());
    for w in [
        "kernel emu_selftest_spin, block (1, 0, 0)",
        "barrier timeout",
    ] {
        assert!(err.contains(w), "{w:?} missing from:\n{err}");
    }
}

#[test]
fn shared_memory_no_thread_wrote_reads_as_poison() {
    let outs = emu::launch("emu_selftest_uninit_shared", dims(2, 64), &[out_f32(64)]).unwrap();
    let v: Vec<f32> = elems_of(&outs[0]);
    for (t, x) in v.iter().enumerate() {
        // Thread t reads slot t + 1: written (1.0) by the even threads only.
        if (t + 1) % 64 % 2 == 0 {
            assert_eq!(*x, 1.0, "thread {t}");
        } else {
            assert!(x.is_nan(), "thread {t} read {x}, not the poison");
        }
    }
}

#[test]
fn a_write_past_a_buffer_is_an_address_sanitizer_report() {
    let err = emu::launch(
        "emu_selftest_out_of_bounds",
        dims(2, 64),
        &[out_f32(100), Arg::U32(100)],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("heap-buffer-overflow") && err.contains("emu_selftest_out_of_bounds"),
        "{err}"
    );
}

#[test]
fn arguments_the_kernel_does_not_take_are_errors() {
    let err = emu::launch(
        "emu_selftest_out_of_bounds",
        dims(1, 32),
        &[out_f32(32), Arg::F32(1.0)],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("argument 1 is an f32, the kernel takes a 32-bit integer"),
        "{err}"
    );
    let err = emu::launch("no_such_kernel", dims(1, 32), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("no kernel named no_such_kernel"), "{err}");
    let too_wide = LaunchDims {
        block: (2048, 1, 1),
        ..dims(1, 32)
    };
    assert!(emu::launch("emu_selftest_warp", too_wide, &[out_f32(1)]).is_err());
}
