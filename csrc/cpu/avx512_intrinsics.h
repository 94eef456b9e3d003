// <immintrin.h> for the AVX-512 kernel files, included right after their target pragma (so
// before anything else includes it). GCC 12 reports the AVX-512 intrinsics' undefined
// pass-through operand (`__m512 __Y = __Y;` in avx512fintrin.h) as used, or maybe used,
// uninitialized once they are inlined into some loops, hundreds of times: a false positive (GCC
// bug 105593), silenced here for the intrinsics' own header lines only, not for the kernels' code.
#pragma once

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#pragma GCC diagnostic pop
