// Bit-layout constants and the decode rule shared by the CPU and CUDA kernels.
// No ATen here: this header is included by host C++ and by device code alike.
//
// The kernels read the STORED qweight (FORMAT.md §4) unchanged, plus a small table
// built once by prepare_params() (mbwq_ops/format.py: `make_blocks`):
//
//   blocks : int32 [K/32, 3], one row per 32 stored rows ("block")
//            blocks[j] = { bits, word, group }
//              bits  : code width of stored rows 32j .. 32j+31   (2, 3, 4, 5, 6 or 8)
//              word  : qweight row holding the block's first code  (block = `bits` words)
//              group : row of scales/zeros for these 32 rows
//   perm   : int32 [K] with perm[k] = input feature of stored row k, or int32 [0] = identity
//
// Every group of the format has a multiple of 32 rows, so a block never straddles a group or
// a width change, and one table serves uniform and mixed layers alike (uniform = one width).
//
// Inside a block, one column's `bits` words form a little-endian bit string; stored row r of
// the block holds the code in string bits [r*bits, r*bits + bits):
//
//     word 0                      word 1                      ...
//     bit 0 ........... bit 31    bit 32 .......... bit 63
//     |code0|code1|code2|...|co   de10|code11|...              (3-bit example: code 10
//                              ^ straddles words 0 and 1)
//
// Dequantized weight (single rounding to fp16, bit-exact with the original):
//     W[perm[32j + r], n] = fp16( code * scales[group, n] - zeros[group, n] )
#pragma once
#include <stdint.h>

#ifdef __CUDACC__
#define MBWQ_HD __host__ __device__ __forceinline__
#else
#define MBWQ_HD inline
#endif

namespace mbwq {

constexpr int kBlockRows = 32;   // stored rows per block; every group is a multiple of this
constexpr int kBlockCols = 3;    // columns of the blocks table: bits, word, group

// One row of the blocks table. The table is int32 [K/32, 3] in memory; code reads entries
// only through block_entry, so the column order is stated here once.
struct BlockEntry {
  int32_t bits;   // code width of the block's 32 stored rows
  int32_t word;   // qweight row holding the block's first code
  int32_t group;  // row of scales / zeros
};

MBWQ_HD BlockEntry block_entry(const int32_t* table, int64_t j) {
  return BlockEntry{table[kBlockCols * j + 0], table[kBlockCols * j + 1],
                    table[kBlockCols * j + 2]};
}

// Widths the format allows.
MBWQ_HD bool valid_bits(int b) {
  return b == 2 || b == 3 || b == 4 || b == 5 || b == 6 || b == 8;
}

// Code of row r (0..31) of a block whose words for one column are w[0..bits-1].
// Reads at most two words; the second only when the code straddles a word boundary.
MBWQ_HD uint32_t block_code(const uint32_t* w, int bits, int r) {
  const int bit = r * bits;
  const int j = bit >> 5;
  const int s = bit & 31;
  uint32_t v = w[j] >> s;
  if (s + bits > 32) v |= w[j + 1] << (32 - s);
  return v & ((1u << bits) - 1u);
}

}  // namespace mbwq
