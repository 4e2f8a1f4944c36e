// Stands in for the CUDA toolkit's cuda_fp16.h in the emulation harness: the types and conversions the
// kernels use are in cuda_emu.h, which the harness force-includes.
#pragma once
#include "../cuda_emu.h"
