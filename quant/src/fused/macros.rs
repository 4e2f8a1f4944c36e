//! The scaffolding every fused op shares, written once: dispatch on the element type, and the
//! candle `CustomOp1` / `CustomOp2` impls whose forwards call `cpu::<fwd>` on the CPU and
//! `cuda::<fwd>` on CUDA with one argument list (and `emu::<fwd>`, the emulated kernels, on the
//! CPU with the `emulate` feature). Declared first in [`super`], so every module of
//! `fused` sees them.

/// `$body` with `$T` the element type of `$dtype` (f32, bf16 or f16) and, when named, `$sfx` its
/// kernel suffix (`"f32"`, `"bf16"`, `"f16"`); any other dtype is an error naming `$what`.
macro_rules! by_dtype {
    ($dtype:expr, $what:expr, $T:ident $(, $sfx:ident)? => $body:expr) => {
        match $dtype {
            ::candle_core::DType::F32 => {
                type $T = f32;
                $(let $sfx = "f32";)?
                $body
            }
            ::candle_core::DType::BF16 => {
                type $T = ::half::bf16;
                $(let $sfx = "bf16";)?
                $body
            }
            ::candle_core::DType::F16 => {
                type $T = ::half::f16;
                $(let $sfx = "f16";)?
                $body
            }
            other => ::candle_core::bail!("{}: unsupported dtype {other:?}", $what),
        }
    };
}

/// `impl CustomOp1 for $op`. The forward is `cpu::$fwd(storage, layout, $args…)` on the CPU and
/// `cuda::$fwd(storage, layout, $args…)` on CUDA (`cpu` and `cuda` as named where the macro is
/// used; with the `emulate` feature, `emu::$fwd` on the CPU: the kernels in the harness), with output shape `$shape`; `$self` and `$l` name the op and the input layout inside
/// `$name`, `$args` and `$shape`. `bwd(x, y, dy)`, when given, is the backward (without it, candle
/// reports that the op has none).
macro_rules! custom_op1 {
    (
        $op:ty, |$self:ident, $l:ident| {
            name: $name:expr,
            fwd: $fwd:ident($($arg:expr),* $(,)?),
            shape: $shape:expr
            $(, bwd($x:ident, $y:ident, $dy:ident): $bwd:expr)? $(,)?
        }
    ) => {
        impl ::candle_core::CustomOp1 for $op {
            fn name(&$self) -> &'static str {
                $name
            }
            fn cpu_fwd(
                &$self,
                s: &::candle_core::CpuStorage,
                $l: &::candle_core::Layout,
            ) -> ::candle_core::Result<(::candle_core::CpuStorage, ::candle_core::Shape)> {
                #[cfg(feature = "emulate")]
                if $crate::emu::active() {
                    return Ok((emu::$fwd(s, $l, $($arg),*)?, $shape));
                }
                Ok((cpu::$fwd(s, $l, $($arg),*)?, $shape))
            }
            #[cfg(feature = "cuda")]
            fn cuda_fwd(
                &$self,
                s: &::candle_core::CudaStorage,
                $l: &::candle_core::Layout,
            ) -> ::candle_core::Result<(::candle_core::CudaStorage, ::candle_core::Shape)> {
                Ok((cuda::$fwd(s, $l, $($arg),*)?, $shape))
            }
            $(
                fn bwd(
                    &$self,
                    $x: &::candle_core::Tensor,
                    $y: &::candle_core::Tensor,
                    $dy: &::candle_core::Tensor,
                ) -> ::candle_core::Result<Option<::candle_core::Tensor>> {
                    $bwd
                }
            )?
        }
    };
}

/// `impl CustomOp2 for $op`, a backward `(x, dy) → dx` (dx shaped as x): `cpu::$fwd(s1, l1, s2,
/// l2, $args…)` on the CPU, `cuda::$fwd(…)` on CUDA; `$self` and `$l1` (x's layout) are named for
/// `$name` and `$args`.
macro_rules! custom_op2 {
    (
        $op:ty, |$self:ident, $l1:ident| {
            name: $name:expr,
            fwd: $fwd:ident($($arg:expr),* $(,)?) $(,)?
        }
    ) => {
        impl ::candle_core::CustomOp2 for $op {
            fn name(&$self) -> &'static str {
                $name
            }
            fn cpu_fwd(
                &$self,
                s1: &::candle_core::CpuStorage,
                $l1: &::candle_core::Layout,
                s2: &::candle_core::CpuStorage,
                l2: &::candle_core::Layout,
            ) -> ::candle_core::Result<(::candle_core::CpuStorage, ::candle_core::Shape)> {
                #[cfg(feature = "emulate")]
                if $crate::emu::active() {
                    return Ok((emu::$fwd(s1, $l1, s2, l2, $($arg),*)?, $l1.shape().clone()));
                }
                Ok((cpu::$fwd(s1, $l1, s2, l2, $($arg),*)?, $l1.shape().clone()))
            }
            #[cfg(feature = "cuda")]
            fn cuda_fwd(
                &$self,
                s1: &::candle_core::CudaStorage,
                $l1: &::candle_core::Layout,
                s2: &::candle_core::CudaStorage,
                l2: &::candle_core::Layout,
            ) -> ::candle_core::Result<(::candle_core::CudaStorage, ::candle_core::Shape)> {
                Ok((cuda::$fwd(s1, $l1, s2, l2, $($arg),*)?, $l1.shape().clone()))
            }
        }
    };
}
