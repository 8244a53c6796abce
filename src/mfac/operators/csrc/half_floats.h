/* 16-bit floats widened to float32 in registers, shared by the kernels that read bfloat16 or
   float16 data: bfloat16 by a 16-bit shift (exact), IEEE half through the compiler's _Float16
   where it has one (MFAC_HAS_F16 says whether it does; without it from_f16 is a stub that the
   Python side never calls, since it asks mfac_*_has_f16 first). */
#ifndef MFAC_HALF_FLOATS_H
#define MFAC_HALF_FLOATS_H

#include <stdint.h>
#include <string.h>

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#if defined(__FLT16_MAX__)
#define MFAC_HAS_F16 1
static inline float from_f16(uint16_t h) {
    _Float16 v;
    memcpy(&v, &h, sizeof v);
    return (float)v;
}
#else
#define MFAC_HAS_F16 0
static inline float from_f16(uint16_t h) { (void)h; return 0.0f; }
#endif

#endif /* MFAC_HALF_FLOATS_H */
