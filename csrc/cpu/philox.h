// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3"), as Triton's
// tl.rand / tl.randint4x compute it (triton/language/random.py), shared by the CPU kernels that
// draw dropout masks (attention.cpp, dropout.cpp).
#pragma once

#include <cstdint>

#include "cpu/cpu_common.h"

namespace bertkern {

// The four output words for counter (lo32(n), hi32(n), 0, 0) and key (key0, key1).
// The 32-bit state words live in 64-bit variables whose high halves are don't-care: products
// take the low halves only ((x & low) * A), and only low halves are returned. This is the shape
// GCC vectorizes well across a loop over counters (64-bit lanes, about twice as fast as
// widening uint32 lanes); unused output words are dead code after inlining.
BERTKERN_ALWAYS_INLINE void philox4x32_10(uint64_t n, uint32_t key0, uint32_t key1, uint32_t& w0, uint32_t& w1,
                                    uint32_t& w2, uint32_t& w3) {
  constexpr uint64_t kLow = 0xffffffffu;
  constexpr uint64_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
  constexpr uint64_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  uint64_t c0 = n & kLow, c1 = n >> 32, c2 = 0, c3 = 0, k0 = key0, k1 = key1;
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    const uint64_t prod_a = (c0 & kLow) * kRoundA;
    const uint64_t prod_b = (c2 & kLow) * kRoundB;
    const uint64_t next_c0 = (prod_b >> 32) ^ c1 ^ k0;  // umulhi(B, c2) ^ c1 ^ k0
    const uint64_t next_c2 = (prod_a >> 32) ^ c3 ^ k1;  // umulhi(A, c0) ^ c3 ^ k1
    c1 = prod_b;                                        // low half: B * c2 mod 2^32
    c3 = prod_a;                                        // low half: A * c0 mod 2^32
    c0 = next_c0;
    c2 = next_c2;
    k0 = (k0 + kKeyA) & kLow;
    k1 = (k1 + kKeyB) & kLow;
  }
  w0 = static_cast<uint32_t>(c0);
  w1 = static_cast<uint32_t>(c1);
  w2 = static_cast<uint32_t>(c2);
  w3 = static_cast<uint32_t>(c3);
}

}  // namespace bertkern
