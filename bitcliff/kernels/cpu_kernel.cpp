// Dequant-matmul on the CPU that reads the packed weights: y = x @ dequant(W), W 2/3/4-bit.
//
// The weight is in the CPU layout of `cpu_packed.py` (PackedLayout): columns in blocks of BLOCK =
// 8 (one AVX2 register of fp32 lanes), and for each block its code words contiguous, `[rows,
// BLOCK]`.  Every group of K positions starts on a new word (a group spans WPG words; its tail may
// hold padding codes, read against zero activations).  Within a column:
// * 2 and 4 bits: a word holds CPW = 32 / bits codes at consecutive K positions, LSB first;
// * 3 bits, two planes: each chunk of 32 positions is three words, the low two bits of positions
//   0-15 (2 bits apart, LSB first), those of 16-31, and the 32 high bits, position p's at bit
//   plane_bit(p) (so that a shift and a mask line four of them up with the bytes of a lane, as
//   the low bits are).  Exactly 3 bits per weight, groups padded to 32 positions.
//
// Four schedules (and, at the end of the file, `linear_bf16`: a bf16 weight in nn.Linear's
// layout, for the unembedding's decode):
// * gemm_int (the AVX-512 build, from 2 rows on, groups of at most 256 positions): the
//   activations rounded as for gemv_int, the codes unpacked per tile and group into int16 pairs,
//   and vpdpwssd's 32 products per instruction summed exactly in int32; the same bytes as gemv_int.
// * gemv_int (up to 4 rows, groups of at most 256 positions; one row in the AVX-512 build, on zmm,
//   by gemv_int_pair): the activations rounded per group to 15-bit
//   integers, multiplied with the codes by byte dot products and summed exactly in int32, then
//   `y += s * d * (acc - z * sum(q))` per group: the product of the rounded activations with the
//   dequantized weight up to fp32 rounding (see "Integer activations" below for its cost).
// * gemv (a few rows, decode): per column block and group, accumulate `acc = x . q` over the
//   group's codes, then `y += s * (acc - z * sum(x))`: 2- and 4-bit codes become floats with one
//   mask and one conversion each (3-bit planes with two shifts, two masks and an or more), and no
//   dense weight is ever formed.  Exact up to fp32
//   summation order, as is gemm.
// * gemm (many rows, prefill): per tile of columns, dequantize a slab of K positions, `(q - z) * s`
//   exactly as the reference forms it, into a buffer that stays in the core's cache, and hand it
//   to the BLAS; the slab's dequantization is shared by all rows.
//
// Threads: at::parallel_for over column blocks (gemm: over tiles of them, each tile's BLAS calls on
// its own thread); the loader builds with OpenMP, without which those loops run on one core.  Each
// output column is computed by one thread in a fixed order, so the result does not depend on the
// thread count.
//
// Instruction sets: the AVX2 + FMA + F16C path is compiled when the build enables them (the
// loader asks for exactly these, never -march=native, so every AVX2 machine runs the same code
// and gives the same bytes); otherwise a portable scalar path (shifts and separate multiply-adds: the
// same results up to fp32 rounding, not the same bytes).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define BITCLIFF_AVX2 1
#else
#define BITCLIFF_AVX2 0
#endif
// The AVX-512 build adds the many-rows integer product (gemm_int): vpdpwssd multiplies 32 int16
// pairs per instruction where an fp32 FMA multiplies 16 floats.
#if BITCLIFF_AVX2 && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define BITCLIFF_AVX512 1
#else
#define BITCLIFF_AVX512 0
#endif

namespace {

constexpr int BLOCK = 8;     // output columns per block (fp32 lanes of an AVX2 register)
// Column blocks per tile of the many-rows schedule: 256 columns, so that a slab of 1 MiB holds
// 1024 positions (2-core Xeon, M = 64: 16, 32 and 64 blocks within the noise of each other).
constexpr int64_t TILE_BLOCKS = 32;
constexpr int ROW_TILE = 8;  // activation rows sharing one decode of the weights in gemv

// fp16 -> fp32 for the portable path (IEEE half, subnormals included).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exponent = (h >> 10) & 0x1F;
  uint32_t mantissa = h & 0x3FF;
  uint32_t bits;
  if (exponent == 0x1F) {
    bits = sign | 0x7F800000u | (mantissa << 13);
  } else if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int shift = 0;
      while (!(mantissa & 0x400)) { mantissa <<= 1; ++shift; }
      mantissa &= 0x3FF;
      bits = sign | ((uint32_t)(127 - 15 - shift + 1) << 23) | (mantissa << 13);
    }
  } else {
    bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// The gemv decodes code i of a word as `code << in_place_shift(bits, i)` (a mask, no shift) and
// reads activations pre-scaled by 2^-in_place_shift, so that each product is x * code exactly as a
// real number: the same fp32 rounding as decoding with a shift.  The top code of a full word
// (4- and 2-bit) would reach the sign bit: it is shifted down instead (shift 0).  The scaling is
// exact unless |x| < 2^-98, where x * 2^-shift becomes subnormal (no activation is that small).
constexpr int in_place_shift(int bits, int i) { return bits * (i + 1) > 31 ? 0 : bits * i; }

struct Weight {
  const int32_t* words;   // [n_blocks, groups * wpg, BLOCK]
  const uint16_t* scales; // fp16 bits, [n_blocks, groups, BLOCK]
  const uint8_t* zeros;   // [n_blocks, groups, BLOCK]
  int64_t groups;
  int64_t wpg;            // words per group per column
  int64_t per_group;      // K positions per group: wpg * 32 / bits
};

// Where the high bit of position p (0-31) of a 3-bit chunk lies in its third word: byte p % 16 / 4,
// bit p % 4 for positions 0-15 and 4 + p % 4 for 16-31.  So the high bits of positions s, s + 4,
// s + 8 and s + 12 of either half sit at the same bit of the four bytes.
constexpr int plane_bit(int p) { return 8 * ((p % 16) / 4) + p % 4 + 4 * (p / 16); }

// The code at position i of group g of one column (`words`: the column block's first word, `c`:
// the column within the block): the portable paths' decode of every width.
template <int BITS>
inline uint32_t code_at(const int32_t* words, int64_t wpg, int64_t g, int64_t i, int c) {
  const int32_t* group = words + g * wpg * BLOCK;
  if (BITS == 3) {
    const int64_t chunk = i / 32;
    const int p = (int)(i % 32), t = p % 16;
    const uint32_t low = (uint32_t)group[(3 * chunk + p / 16) * BLOCK + c];
    const uint32_t high = (uint32_t)group[(3 * chunk + 2) * BLOCK + c];
    return ((low >> (2 * t)) & 3u) | (((high >> plane_bit(p)) & 1u) << 2);
  }
  constexpr int CPW = 32 / BITS;
  return ((uint32_t)group[(i / CPW) * BLOCK + c] >> (BITS * (i % CPW))) & ((1u << BITS) - 1);
}

#if BITCLIFF_AVX2
// Code i of each lane's word, left where it lies: `code << shift(i)` (see in_place_shift), one
// instruction.  Exact as a float (at most 4 significant bits), and never negative: a code that
// would reach the sign bit is shifted down instead.
template <int BITS>
inline __m256i code_in_place(__m256i word, int i) {
  if (in_place_shift(BITS, i) == 0 && i > 0) return _mm256_srli_epi32(word, BITS * i);
  return _mm256_and_si256(word, _mm256_set1_epi32((int)(((1u << BITS) - 1) << (BITS * i))));
}

// Code i of each lane's 2- or 4-bit word (0 <= i < 32 / BITS), as an int32.
template <int BITS>
inline __m256i word_code(__m256i word, int i) {
  return _mm256_and_si256(_mm256_srli_epi32(word, BITS * i), _mm256_set1_epi32((1 << BITS) - 1));
}

// Position p's 3-bit code of each lane's chunk (words low0, low1, high), as an int32.
inline __m256i plane_code(__m256i low0, __m256i low1, __m256i high, int p) {
  const int t = p % 16, bit = plane_bit(p);
  const __m256i low = _mm256_and_si256(_mm256_srli_epi32(p < 16 ? low0 : low1, 2 * t), _mm256_set1_epi32(3));
  const __m256i top = bit >= 2 ? _mm256_srli_epi32(high, bit - 2) : _mm256_slli_epi32(high, 2 - bit);
  return _mm256_or_si256(low, _mm256_and_si256(top, _mm256_set1_epi32(4)));
}
#endif

// y[r, block] for rows [row0, row0 + ROWS) of x, ROWS <= ROW_TILE (a constant, so that the
// accumulators live in registers).
template <int BITS, int ROWS>
void gemv_tile(const Weight& w, int64_t block, const float* x, const float* xsum, int64_t k_positions,
               int64_t row0, float* y, int64_t y_stride) {
  constexpr int rows = ROWS;
  constexpr int CPW = 32 / BITS;
  const int64_t positions = w.per_group;
  const int32_t* words = w.words + block * w.groups * w.wpg * BLOCK;
  const uint16_t* scales = w.scales + block * w.groups * BLOCK;
  const uint8_t* zeros = w.zeros + block * w.groups * BLOCK;
#if BITCLIFF_AVX2
  // Independent accumulator chains: with one per row, every FMA would wait for the previous one
  // (4-5 cycles of latency per 8 weights); code i of a word goes to chain i % CHAINS.
  constexpr int CHAINS = ROWS >= 4 ? 1 : (ROWS == 1 ? 4 : 2);
  __m256 total[ROWS];
  for (int r = 0; r < ROWS; ++r) total[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < w.groups; ++g) {
    __m256 acc[ROWS][CHAINS];
    for (int r = 0; r < ROWS; ++r)
      for (int c = 0; c < CHAINS; ++c) acc[r][c] = _mm256_setzero_ps();
    if constexpr (BITS == 3) {
      for (int64_t j = 0; j < w.wpg; j += 3) {
        const __m256i* chunk = (const __m256i*)(words + (g * w.wpg + j) * BLOCK);
        const __m256i low0 = _mm256_loadu_si256(chunk), low1 = _mm256_loadu_si256(chunk + 1);
        const __m256i high = _mm256_loadu_si256(chunk + 2);
        const int64_t k0 = g * positions + j / 3 * 32;
#pragma GCC unroll 32
        for (int i = 0; i < 32; ++i) {
          const __m256 q = _mm256_cvtepi32_ps(plane_code(low0, low1, high, i));
          for (int r = 0; r < ROWS; ++r) {
            acc[r][i % CHAINS] =
                _mm256_fmadd_ps(_mm256_broadcast_ss(x + (row0 + r) * k_positions + k0 + i), q, acc[r][i % CHAINS]);
          }
        }
      }
    } else {
      for (int64_t j = 0; j < w.wpg; ++j) {
        const __m256i word = _mm256_loadu_si256((const __m256i*)(words + (g * w.wpg + j) * BLOCK));
        const int64_t k0 = g * positions + j * CPW;
#pragma GCC unroll 16
        for (int i = 0; i < CPW; ++i) {
          const __m256 q = _mm256_cvtepi32_ps(code_in_place<BITS>(word, i));
          for (int r = 0; r < ROWS; ++r) {
            acc[r][i % CHAINS] =
                _mm256_fmadd_ps(_mm256_broadcast_ss(x + (row0 + r) * k_positions + k0 + i), q, acc[r][i % CHAINS]);
          }
        }
      }
    }
    const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(scales + g * BLOCK)));
    const __m256 z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(zeros + g * BLOCK))));
    for (int r = 0; r < ROWS; ++r) {
      __m256 sum = acc[r][0];
      for (int c = 1; c < CHAINS; ++c) sum = _mm256_add_ps(sum, acc[r][c]);
      const __m256 centred = _mm256_fnmadd_ps(z, _mm256_broadcast_ss(xsum + (row0 + r) * w.groups + g), sum);
      total[r] = _mm256_fmadd_ps(s, centred, total[r]);
    }
  }
  for (int r = 0; r < ROWS; ++r) _mm256_storeu_ps(y + (row0 + r) * y_stride + block * BLOCK, total[r]);
#else
  float total[ROWS][BLOCK] = {};
  for (int64_t g = 0; g < w.groups; ++g) {
    float acc[ROWS][BLOCK] = {};
    for (int64_t i = 0; i < positions; ++i) {
      for (int r = 0; r < rows; ++r) {
        const float xv = x[(row0 + r) * k_positions + g * positions + i];
        for (int c = 0; c < BLOCK; ++c) acc[r][c] = acc[r][c] + xv * (float)code_at<BITS>(words, w.wpg, g, i, c);
      }
    }
    for (int r = 0; r < rows; ++r) {
      const float xs = xsum[(row0 + r) * w.groups + g];
      for (int c = 0; c < BLOCK; ++c) {
        const float centred = acc[r][c] - (float)zeros[g * BLOCK + c] * xs;
        total[r][c] = total[r][c] + half_to_float(scales[g * BLOCK + c]) * centred;
      }
    }
  }
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < BLOCK; ++c) y[(row0 + r) * y_stride + block * BLOCK + c] = total[r][c];
  }
#endif
}

// The dense fp32 weight of column blocks [first_block, first_block + n_blocks) over groups
// [first_group, end_group), `(q - z) * s` exactly as the reference forms it, written at
// `out[k * ld + c]` (k counted from the first group, c from the first block's first column).
// Each step decodes one word (or 3-bit chunk) of every block in turn, so the rows it writes fill
// whole cache lines while they are in L1: block by block, a row's 32 bytes at a time, every store
// missed the cache (15x slower).
template <int BITS>
void dequantize_blocks(const Weight& w, int64_t first_block, int64_t n_blocks, int64_t first_group,
                       int64_t end_group, float* out, int64_t ld) {
  constexpr int CPW = 32 / BITS;
  const int64_t block_words = w.groups * w.wpg * BLOCK;
  out -= first_group * w.per_group * ld;  // rows are written at their position within the range
  for (int64_t g = first_group; g < end_group; ++g) {
#if BITCLIFF_AVX2
    constexpr int64_t STEP = BITS == 3 ? 3 : 1;       // words per step
    constexpr int POSITIONS = BITS == 3 ? 32 : CPW;   // positions per step
    for (int64_t j = 0; j < w.wpg; j += STEP) {
      float* rows = out + (g * w.per_group + j / STEP * POSITIONS) * ld;
      for (int64_t b = 0; b < n_blocks; ++b) {
        const int64_t block = first_block + b;
        const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w.scales + (block * w.groups + g) * BLOCK)));
        const __m256 z = _mm256_cvtepi32_ps(
            _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(w.zeros + (block * w.groups + g) * BLOCK))));
        const __m256i* word = (const __m256i*)(w.words + block * block_words + (g * w.wpg + j) * BLOCK);
        float* column = rows + b * BLOCK;
        if constexpr (BITS == 3) {
          const __m256i low0 = _mm256_loadu_si256(word), low1 = _mm256_loadu_si256(word + 1);
          const __m256i high = _mm256_loadu_si256(word + 2);
#pragma GCC unroll 32
          for (int i = 0; i < 32; ++i) {
            const __m256 q = _mm256_cvtepi32_ps(plane_code(low0, low1, high, i));
            _mm256_storeu_ps(column + i * ld, _mm256_mul_ps(_mm256_sub_ps(q, z), s));
          }
        } else {
          const __m256i codes = _mm256_loadu_si256(word);
#pragma GCC unroll 16
          for (int i = 0; i < CPW; ++i) {
            const __m256 q = _mm256_cvtepi32_ps(word_code<BITS>(codes, i));
            _mm256_storeu_ps(column + i * ld, _mm256_mul_ps(_mm256_sub_ps(q, z), s));
          }
        }
      }
    }
#else
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int64_t block = first_block + b;
      const int32_t* words = w.words + block * block_words;
      for (int64_t i = 0; i < w.per_group; ++i) {
        float* row = out + (g * w.per_group + i) * ld + b * BLOCK;
        for (int c = 0; c < BLOCK; ++c) {
          const float q = (float)code_at<BITS>(words, w.wpg, g, i, c);
          row[c] = (q - (float)w.zeros[(block * w.groups + g) * BLOCK + c]) *
                   half_to_float(w.scales[(block * w.groups + g) * BLOCK + c]);
        }
      }
    }
#endif
  }
}

Weight check_weight(const at::Tensor& words, const at::Tensor& scales, const at::Tensor& zeros, int64_t bits) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4, "bits must be 2, 3 or 4, got ", bits);
  TORCH_CHECK(words.dtype() == at::kInt && words.dim() == 3 && words.size(2) == BLOCK && words.is_contiguous(),
              "words must be contiguous int32 [blocks, rows, ", BLOCK, "]");
  TORCH_CHECK(scales.dtype() == at::kHalf && scales.dim() == 3 && scales.size(2) == BLOCK && scales.is_contiguous(),
              "scales must be contiguous fp16 [blocks, groups, ", BLOCK, "]");
  TORCH_CHECK(zeros.dtype() == at::kByte && zeros.sizes() == scales.sizes() && zeros.is_contiguous(),
              "zeros must be contiguous uint8 of the scales' shape");
  TORCH_CHECK(scales.size(0) == words.size(0) && scales.size(1) > 0 && words.size(1) % scales.size(1) == 0,
              "words [", words.size(0), ", ", words.size(1), "] do not fit scales [", scales.size(0), ", ",
              scales.size(1), "]");
  const int64_t wpg = words.size(1) / scales.size(1);
  TORCH_CHECK(bits != 3 || wpg % 3 == 0, "3-bit groups take whole chunks of 3 words, got ", wpg, " words per group");
  return Weight{words.data_ptr<int32_t>(), reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()),
                zeros.data_ptr<uint8_t>(), scales.size(1), wpg, wpg * 32 / bits};
}

template <int BITS>
void gemv_all(const Weight& w, const float* x, const float* xsum, int64_t k_positions, int64_t rows, int64_t blocks,
              float* y) {
  // A task of at least ~32k weights, so that waking a thread pays for itself on small layers.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, k_positions * BLOCK));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t r0 = 0; r0 < rows; r0 += ROW_TILE) {
        switch (std::min<int64_t>(ROW_TILE, rows - r0)) {
          case 1: gemv_tile<BITS, 1>(w, b, x, xsum, k_positions, r0, y, blocks * BLOCK); break;
          case 2: gemv_tile<BITS, 2>(w, b, x, xsum, k_positions, r0, y, blocks * BLOCK); break;
          case 3: gemv_tile<BITS, 3>(w, b, x, xsum, k_positions, r0, y, blocks * BLOCK); break;
          case 4: gemv_tile<BITS, 4>(w, b, x, xsum, k_positions, r0, y, blocks * BLOCK); break;
          case 5: gemv_tile<BITS, 5>(w, b, x, xsum, k_positions, r0, y, blocks * BLOCK); break;
          case 6: gemv_tile<BITS, 6>(w, b, x, xsum, k_positions, r0, y, blocks * BLOCK); break;
          case 7: gemv_tile<BITS, 7>(w, b, x, xsum, k_positions, r0, y, blocks * BLOCK); break;
          default: gemv_tile<BITS, 8>(w, b, x, xsum, k_positions, r0, y, blocks * BLOCK); break;
        }
      }
    }
  });
}

// x_row's value at weight position p: column[p] of the row (or column p where the positions are the
// columns in order), zero for padding (a column index of K or more).
inline float at_position(const float* x_row, const int64_t* column, int64_t k, int64_t p) {
  const int64_t c = column ? column[p] : p;
  return c < k ? x_row[c] : 0.0f;
}

// ---- Integer activations (decode) -------------------------------------------------------------
//
// The fp32 gemv spends most of its time on one FMA (and its broadcast operand) per 8 weights.  Its
// integer form multiplies 32 codes by 32 activations per instruction (vpmaddubsw: unsigned bytes
// times signed bytes, adjacent pairs summed to int16).  The activations are rounded per (row,
// group) to integers of at most ACT_LEVELS in magnitude, q = round(x / d) with d = max|x| / ACT_LEVELS,
// and each q is split into two signed bytes, q = 128 h + l with l in [-64, 63] and h in
// [-127, 127], so that a product is two byte products, exact in integers.  A group then gives
//
//   y += s * d * (sum q * code - z * sum q),
//
// summed exactly in int32 and converted once per group: the product of the rounded activations
// d * q with the dequantized weight, up to fp32 rounding.  Rounding x to 15 bits (1/16319 of the
// group's largest value) moved SmolLM2's perplexity on wiki (RTN W4 g64, 16 windows of 512) by
// -0.0002 % where 8-bit activations (llama.cpp's) moved it by +0.32 % (bench.activation_rounding).
//
// Codes come in units of positions whose fields line up with bytes after one shift and a mask:
// a 4-bit word (8 positions, 2 vectors), a 2-bit word (16 positions, 4 vectors), and half a 3-bit
// chunk (16 positions, 4 vectors: the low plane's 2 bits, or-ed with the high plane's bit).  Code
// vector v of a unit holds in byte b of each lane the code at position v + VECTORS * b, and the
// activations are stored in that order, four bytes per broadcast.
constexpr int ACT_LEVELS = 16319;        // 127 * 128 + 63: the largest q whose high byte fits
constexpr int64_t INT_MAX_POSITIONS = 256;  // group sizes up to this keep |sum q * code| < 2^31
// Rows up to which the integer variant runs: its tiles of at most 4 rows decode the weights once
// per 4 rows, the fp32 gemv's once per 8, and from 8 rows on it was no faster (M = 1-48, 2 threads,
// 4096 x 14336 and 576 x 1536: W4 1.36x faster at M = 1, 1.2x at 4, 0.9-1.0x at 8-16).
constexpr int64_t INT_MAX_ROWS = 4;

constexpr int vectors(int bits) { return bits == 4 ? 2 : 4; }  // code vectors per unit
constexpr int unit_positions(int bits) { return 4 * vectors(bits); }

// A step of the integer loop: one word (2 and 4 bits) or one 3-bit chunk of three words, two units.
template <int BITS>
constexpr int step_words() { return BITS == 3 ? 3 : 1; }
template <int BITS>
constexpr int step_units() { return BITS == 3 ? 2 : 1; }

// Steps summed in int16 before they are widened: a unit adds at most 2 * VECTORS products of
// |code * byte| <= (2^BITS - 1) * 127 to an int16 lane: 4-bit 7620 per word, 2-bit 3048 per word,
// 3-bit 7112 per half chunk; 4 words, 8 words and 2 chunks stay under 32767.
template <int BITS>
constexpr int flush_steps() { return BITS == 4 ? 4 : (BITS == 2 ? 8 : 2); }

struct IntActivations {
  const int32_t* bytes;  // [rows, units, 2, VECTORS]: the high then the low bytes, four per int32
  const float* step;     // [rows, groups]: d
  const int32_t* sum;    // [rows, groups]: sum of q over the group
  int64_t units;         // units per row
};

#if BITCLIFF_AVX2
// The few integer operations unit_codes needs, on 256-bit (AVX2) and 512-bit (AVX-512) vectors.
inline __m256i shift_right(__m256i v, int n) { return _mm256_srli_epi32(v, n); }
inline __m256i shift_left(__m256i v, int n) { return _mm256_slli_epi32(v, n); }
inline __m256i bits_and(__m256i a, __m256i b) { return _mm256_and_si256(a, b); }
inline __m256i bits_or(__m256i a, __m256i b) { return _mm256_or_si256(a, b); }
template <class Vec>
inline Vec every_byte(char c) { return _mm256_set1_epi8(c); }
#if BITCLIFF_AVX512
inline __m512i shift_right(__m512i v, int n) { return _mm512_srli_epi32(v, n); }
inline __m512i shift_left(__m512i v, int n) { return _mm512_slli_epi32(v, n); }
inline __m512i bits_and(__m512i a, __m512i b) { return _mm512_and_si512(a, b); }
inline __m512i bits_or(__m512i a, __m512i b) { return _mm512_or_si512(a, b); }
template <>
inline __m512i every_byte<__m512i>(char c) { return _mm512_set1_epi8(c); }
#endif

// Code vector v of unit u of a step (`word`: its words), bytes lined up as described above.
template <int BITS, class Vec>
inline Vec unit_codes(const Vec* word, int u, int v) {
  if constexpr (BITS == 3) {
    // low plane: position v + 4b of the half at bits 2v + 8b; high plane: at bit 8b + v + 4u
    const Vec low = bits_and(v == 0 ? word[u] : shift_right(word[u], 2 * v), every_byte<Vec>(3));
    const int bit = v + 4 * u;
    const Vec top = bit >= 2 ? shift_right(word[2], bit - 2) : shift_left(word[2], 2 - bit);
    return bits_or(low, bits_and(top, every_byte<Vec>(4)));
  } else {
    const Vec shifted = v == 0 ? word[0] : shift_right(word[0], BITS * v);
    return bits_and(shifted, every_byte<Vec>((char)((1 << BITS) - 1)));
  }
}

// Pairs of products of code bytes with activation bytes summed into int16 lanes (exact:
// flush_steps bounds them).
inline __m256i add_byte_products(__m256i sum, __m256i codes, __m256i x) {
  return _mm256_add_epi16(sum, _mm256_maddubs_epi16(codes, x));
}
// 128 h + l of the int16 sums of the high and the low bytes, widened to int32 (pairs of lanes added).
inline __m256i combine_halves(__m256i high, __m256i low) {
  return _mm256_add_epi32(_mm256_madd_epi16(high, _mm256_set1_epi16(128)), _mm256_madd_epi16(low, _mm256_set1_epi16(1)));
}
#endif

// How far ahead of its loads the integer decode asks for each block's words: 64 words, 2 KiB.
// Without it the hardware's own prefetch left W4's loads waiting on memory (54 % of the samples
// on the two instructions after them, one core); with it W4 ran 1.35-1.46x faster (2-core Zen 5
// EPYC, M = 1, 2 threads, Llama-3 shapes, best of two runs each; 128 words no better).  Past the
// end of the weight it is a hint for memory never read: a prefetch does not fault.
constexpr int64_t PREFETCH_WORDS = 64;

// y[r, columns of blocks [block, block + COLS)] = sum_g s * d * (sum q * code - z * sum q) for
// rows [row0, row0 + ROWS): the COLS blocks share each broadcast of the activations.
template <int BITS, int ROWS, int COLS>
void gemv_int_tile(const Weight& w, int64_t block, const IntActivations& a, int64_t row0, float* y, int64_t y_stride) {
  constexpr int V = vectors(BITS), SW = step_words<BITS>(), SU = step_units<BITS>();
  const int64_t block_words = w.groups * w.wpg * BLOCK, block_groups = w.groups * BLOCK;
  const int64_t steps = w.wpg / SW, group_units = steps * SU;
  const int32_t* words = w.words + block * block_words;
  const uint16_t* scales = w.scales + block * block_groups;
  const uint8_t* zeros = w.zeros + block * block_groups;
  const int32_t* bytes = a.bytes + row0 * a.units * 2 * V;
#if BITCLIFF_AVX2
  __m256 total[ROWS][COLS];
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < COLS; ++c) total[r][c] = _mm256_setzero_ps();
  for (int64_t g = 0; g < w.groups; ++g) {
    __m256i acc[ROWS][COLS];
    for (int r = 0; r < ROWS; ++r)
      for (int c = 0; c < COLS; ++c) acc[r][c] = _mm256_setzero_si256();
    for (int64_t j0 = 0; j0 < steps; j0 += flush_steps<BITS>()) {
      __m256i high[ROWS][COLS], low[ROWS][COLS];
      for (int r = 0; r < ROWS; ++r)
        for (int c = 0; c < COLS; ++c) high[r][c] = low[r][c] = _mm256_setzero_si256();
      const int64_t j1 = std::min<int64_t>(steps, j0 + flush_steps<BITS>());
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t first_word = g * w.wpg + j * SW, first_unit = g * group_units + j * SU;
        __m256i word[COLS][SW];
        for (int c = 0; c < COLS; ++c) {
          for (int i = 0; i < SW; ++i)
            word[c][i] = _mm256_loadu_si256((const __m256i*)(words + c * block_words + (first_word + i) * BLOCK));
          _mm_prefetch((const char*)(words + c * block_words + (first_word + PREFETCH_WORDS) * BLOCK), _MM_HINT_T0);
        }
#pragma GCC unroll 8
        for (int uv = 0; uv < SU * V; ++uv) {
          const int u = uv / V, v = uv % V;
          __m256i codes[COLS];
          for (int c = 0; c < COLS; ++c) codes[c] = unit_codes<BITS>(word[c], u, v);
          for (int r = 0; r < ROWS; ++r) {
            const int32_t* at = bytes + (r * a.units + first_unit + u) * 2 * V;
            const __m256i x_high = _mm256_set1_epi32(at[v]), x_low = _mm256_set1_epi32(at[V + v]);
            for (int c = 0; c < COLS; ++c) {
              high[r][c] = add_byte_products(high[r][c], codes[c], x_high);
              low[r][c] = add_byte_products(low[r][c], codes[c], x_low);
            }
          }
        }
      }
      for (int r = 0; r < ROWS; ++r)
        for (int c = 0; c < COLS; ++c) acc[r][c] = _mm256_add_epi32(acc[r][c], combine_halves(high[r][c], low[r][c]));
    }
    for (int c = 0; c < COLS; ++c) {
      const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(scales + c * block_groups + g * BLOCK)));
      const __m256i z = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(zeros + c * block_groups + g * BLOCK)));
      for (int r = 0; r < ROWS; ++r) {
        const int64_t at = (row0 + r) * w.groups + g;
        const __m256i centred = _mm256_sub_epi32(acc[r][c], _mm256_mullo_epi32(z, _mm256_set1_epi32(a.sum[at])));
        total[r][c] = _mm256_fmadd_ps(_mm256_mul_ps(s, _mm256_set1_ps(a.step[at])), _mm256_cvtepi32_ps(centred),
                                      total[r][c]);
      }
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < COLS; ++c) _mm256_storeu_ps(y + (row0 + r) * y_stride + (block + c) * BLOCK, total[r][c]);
#else
  constexpr int UNIT = unit_positions(BITS);
  for (int col = 0; col < COLS; ++col) {
    const int32_t* column_words = words + col * block_words;
    float total[ROWS][BLOCK] = {};
    for (int64_t g = 0; g < w.groups; ++g) {
      for (int r = 0; r < ROWS; ++r) {
        int32_t acc[BLOCK] = {};
        for (int64_t i = 0; i < w.per_group; ++i) {
          const int32_t* at = bytes + (r * a.units + g * group_units + i / UNIT) * 2 * V;
          const int v = (int)(i % UNIT) % V, b = (int)(i % UNIT) / V;
          const int32_t q = 128 * (int32_t)(int8_t)(at[v] >> (8 * b)) + (int32_t)(int8_t)(at[V + v] >> (8 * b));
          for (int c = 0; c < BLOCK; ++c) acc[c] += q * (int32_t)code_at<BITS>(column_words, w.wpg, g, i, c);
        }
        const int64_t at = (row0 + r) * w.groups + g, first = col * block_groups + g * BLOCK;
        for (int c = 0; c < BLOCK; ++c) {
          const int32_t centred = acc[c] - (int32_t)zeros[first + c] * a.sum[at];
          total[r][c] += half_to_float(scales[first + c]) * a.step[at] * (float)centred;
        }
      }
    }
    for (int r = 0; r < ROWS; ++r)
      for (int c = 0; c < BLOCK; ++c) y[(row0 + r) * y_stride + (block + col) * BLOCK + c] = total[r][c];
  }
#endif
}

#if BITCLIFF_AVX512
// 16 bytes of a block pair's per-group fields (8 from `first`, 8 from `second`), widened to a zmm
// of int32.
inline __m512i pair_bytes(const uint8_t* first, const uint8_t* second) {
  return _mm512_cvtepu8_epi32(_mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i*)first),
                                                 _mm_loadl_epi64((const __m128i*)second)));
}
inline __m512 pair_halves(const uint16_t* first, const uint16_t* second) {
  return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)first)),
                                                 _mm_loadu_si128((const __m128i*)second), 1));
}

// gemv_int_tile for one row and two column blocks (16 columns, `block` and `block + 1`), on zmm:
// vpdpbusd sums four byte products straight into int32 lanes, where the AVX2 form sums pairs into
// int16 (vpmaddubsw) and widens them every few steps.  The sums are exact integers either way and
// the fp32 epilogue is the same, lane by lane: the same bytes as gemv_int_tile and gemm_int.
// Against gemv_int_tile on a 2-core Zen 5 EPYC (M = 1, 2 threads, g128, the Llama-3 shapes, two
// alternating runs of each build): W4 1.0-1.45x faster, W2 0.9-2.0x, W3 0.85-1.3x (the noise).
template <int BITS>
void gemv_int_pair(const Weight& w, int64_t block, const IntActivations& a, float* y) {
  constexpr int V = vectors(BITS), SW = step_words<BITS>(), SU = step_units<BITS>();
  const int64_t block_words = w.groups * w.wpg * BLOCK, block_groups = w.groups * BLOCK;
  const int64_t steps = w.wpg / SW, group_units = steps * SU;
  const int32_t* first = w.words + block * block_words;
  const int32_t* second = first + block_words;
  const uint16_t* scales = w.scales + block * block_groups;
  const uint8_t* zeros = w.zeros + block * block_groups;
  __m512 total = _mm512_setzero_ps();
  for (int64_t g = 0; g < w.groups; ++g) {
    __m512i high = _mm512_setzero_si512(), low = _mm512_setzero_si512();
    for (int64_t j = 0; j < steps; ++j) {
      const int64_t first_word = g * w.wpg + j * SW, first_unit = g * group_units + j * SU;
      __m512i word[SW];
      for (int i = 0; i < SW; ++i) {
        const int64_t at = (first_word + i) * BLOCK;
        word[i] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(first + at))),
                                     _mm256_loadu_si256((const __m256i*)(second + at)), 1);
      }
      _mm_prefetch((const char*)(first + (first_word + PREFETCH_WORDS) * BLOCK), _MM_HINT_T0);
      _mm_prefetch((const char*)(second + (first_word + PREFETCH_WORDS) * BLOCK), _MM_HINT_T0);
#pragma GCC unroll 8
      for (int uv = 0; uv < SU * V; ++uv) {
        const int u = uv / V, v = uv % V;
        const __m512i codes = unit_codes<BITS>(word, u, v);  // word: the same word of two blocks
        const int32_t* at = a.bytes + (first_unit + u) * 2 * V;
        high = _mm512_dpbusd_epi32(high, codes, _mm512_set1_epi32(at[v]));
        low = _mm512_dpbusd_epi32(low, codes, _mm512_set1_epi32(at[V + v]));
      }
    }
    const __m512i acc = _mm512_add_epi32(_mm512_slli_epi32(high, 7), low);  // 128 h + l, exact
    const __m512i z = pair_bytes(zeros + g * BLOCK, zeros + block_groups + g * BLOCK);
    const __m512 s = pair_halves(scales + g * BLOCK, scales + block_groups + g * BLOCK);
    const __m512i centred = _mm512_sub_epi32(acc, _mm512_mullo_epi32(z, _mm512_set1_epi32(a.sum[g])));
    total = _mm512_fmadd_ps(_mm512_mul_ps(s, _mm512_set1_ps(a.step[g])), _mm512_cvtepi32_ps(centred), total);
  }
  _mm512_storeu_ps(y + block * BLOCK, total);
}
#endif

constexpr int INT_ROW_TILE = 4;  // rows per tile: four rows' int16 and int32 accumulators fill the 16 registers
// Column blocks per tile for a single row (the AVX2 build): two 4-bit blocks share each broadcast
// of x (M = 1, g128, interleaved, with the kernel then on one core: 1.2-1.3x faster than one on
// the Llama-3 shapes, four no better),
// where 2-bit weights ran 1.1-1.2x slower with two than with one.
template <int BITS>
constexpr int one_row_cols() { return BITS == 4 ? 2 : 1; }

template <int BITS>
void gemv_int_all(const Weight& w, const IntActivations& a, int64_t k_positions, int64_t rows, int64_t blocks, float* y) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, k_positions * BLOCK));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    int64_t b = begin;
    if (rows == 1) {
#if BITCLIFF_AVX512
      for (; b + 2 <= end; b += 2) gemv_int_pair<BITS>(w, b, a, y);
#else
      constexpr int COLS = one_row_cols<BITS>();
      for (; b + COLS <= end; b += COLS) gemv_int_tile<BITS, 1, COLS>(w, b, a, 0, y, blocks * BLOCK);
#endif
    }
    for (; b < end; ++b) {
      for (int64_t r0 = 0; r0 < rows; r0 += INT_ROW_TILE) {
        switch (std::min<int64_t>(INT_ROW_TILE, rows - r0)) {
          case 1: gemv_int_tile<BITS, 1, 1>(w, b, a, r0, y, blocks * BLOCK); break;
          case 2: gemv_int_tile<BITS, 2, 1>(w, b, a, r0, y, blocks * BLOCK); break;
          case 3: gemv_int_tile<BITS, 3, 1>(w, b, a, r0, y, blocks * BLOCK); break;
          default: gemv_int_tile<BITS, 4, 1>(w, b, a, r0, y, blocks * BLOCK); break;
        }
      }
    }
  });
}

// Rounds one row's activations in one group, `values` [n]: q[i] = round(values[i] / d) with
// d = max|values| / ACT_LEVELS, so |q| <= ACT_LEVELS.  Returns d, or NaN where a value is not
// finite (every q then 0), so that the group's outputs are NaN as the fp32 path's would be (or
// inf: NaN here); `total` gets the sum of the q.  The one rounding of both integer schedules.
float round_group(const float* values, int64_t n, int32_t* q, int32_t* total) {
  float largest = 0.0f;
  for (int64_t i = 0; i < n; ++i) largest = std::max(largest, std::fabs(values[i]));  // blind to NaN: below
  const float d = largest / (float)ACT_LEVELS;
  bool finite = std::isfinite(largest);
  for (int64_t i = 0; i < n && finite; ++i) finite = std::isfinite(values[i]);
  int32_t sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    q[i] = (finite && d > 0.0f) ? (int32_t)std::nearbyint(values[i] / d) : 0;
    sum += q[i];
  }
  *total = sum;
  return finite ? d : std::numeric_limits<float>::quiet_NaN();
}

// The activations at the weight's positions, rounded per group for gemv_int_tile: `bytes` [rows,
// units, 2, VECTORS] int32, `step` [rows, groups] fp32 and `sum` [rows, groups] int32 (see
// IntActivations).  Padding positions hold zeros.
void round_positions(const at::Tensor& x, const at::Tensor* columns, int64_t bits, int64_t groups, int64_t per_group,
                     at::Tensor& bytes, at::Tensor& step, at::Tensor& sum) {
  const int64_t rows = x.size(0), k = x.size(1), vector_count = vectors((int)bits);
  const int64_t unit = unit_positions((int)bits), units = groups * per_group / unit;
  const int64_t* column = columns ? columns->data_ptr<int64_t>() : nullptr;
  const float* src = x.data_ptr<float>();
  uint8_t* out = reinterpret_cast<uint8_t*>(bytes.data_ptr<int32_t>());
  float* steps = step.data_ptr<float>();
  int32_t* sums = sum.data_ptr<int32_t>();
  std::vector<float> values(per_group);
  std::vector<int32_t> q(per_group);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t i = 0; i < per_group; ++i) values[i] = at_position(src + r * k, column, k, g * per_group + i);
      steps[r * groups + g] = round_group(values.data(), per_group, q.data(), &sums[r * groups + g]);
      for (int64_t i = 0; i < per_group; ++i) {
        const int32_t low = ((q[i] + 64) & 127) - 64, high = (q[i] - low) / 128;
        // position i of the group: unit i / unit, vector (i % unit) % vectors, byte (i % unit) / vectors
        const int64_t at_unit = g * (per_group / unit) + i / unit, v = (i % unit) % vector_count,
                      b = (i % unit) / vector_count;
        uint8_t* at = out + ((r * units + at_unit) * 2 * vector_count) * 4;
        at[v * 4 + b] = (uint8_t)(int8_t)high;
        at[(vector_count + v) * 4 + b] = (uint8_t)(int8_t)low;
      }
    }
  }
}

// The activations at the weight's K positions for gemv_tile, xk [rows, positions] fp32: column
// columns[p] of x (a zero where columns[p] == K, padding), or x's columns in order then zeros, each
// scaled by 2^-in_place_shift (exact: a power of two) for the AVX2 decode; xsum [rows, groups]
// gets the unscaled sum of each group's activations.
void gather_positions(const at::Tensor& x, const at::Tensor* columns, int64_t bits, int64_t groups,
                      at::Tensor& xk, at::Tensor& xsum) {
  // 3-bit planes are decoded with shifts (plane_code), so their activations are not scaled
  const int64_t rows = x.size(0), k = x.size(1), per_word = bits == 3 ? 1 : 32 / bits;
  const int64_t positions = xk.size(1), per_group = positions / groups;
  std::vector<float> factors(per_word, 1.0f);
#if BITCLIFF_AVX2
  if (bits != 3)
    for (int i = 0; i < per_word; ++i) factors[i] = std::ldexp(1.0f, -in_place_shift((int)bits, i));
#endif
  const int64_t* column = columns ? columns->data_ptr<int64_t>() : nullptr;
  const float* src = x.data_ptr<float>();
  float* dst = xk.data_ptr<float>();
  float* sums = xsum.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      float sum = 0.0f;
      for (int64_t i = 0; i < per_group; ++i) {
        const int64_t p = g * per_group + i;
        const float v = at_position(src + r * k, column, k, p);
        sum += v;
        dst[r * positions + p] = v * factors[i % per_word];
      }
      sums[r * groups + g] = sum;
    }
  }
}

// ---- Integer activations, many rows (prefill; the AVX-512 build) ------------------------------
//
// With fp32 products, many rows cost what fp32's own GEMM costs: one FMA per 16 multiply-adds,
// whatever the weights' width.  Here the activations are rounded as for gemv_int (round_group:
// 15-bit integers q per row and group, step d) and kept as int16; the weight's codes become int16
// `c - z`, and vpdpwssd multiplies 32 such pairs per instruction, summed exactly in int32 lanes
// (|q (c - z)| <= 16319 * 15, at most INT_MAX_POSITIONS per group: under 2^31).  Each group then
// adds `s * d * sum q (c - z)` to y with one fma, in the order gemv_int_tile adds its groups, so
// for the same rows the two give the same bytes.
//
// Schedule: a thread owns tiles of INT_TILE_VECTORS * 16 columns.  For each group it unpacks the
// tile's codes into a panel of int16 pairs (positions 2p and 2p + 1 of a column in one int32,
// [pairs, columns]: a load gives one pair of 16 columns), small enough to stay in L1 while every
// row runs over it, INT_TILE_ROWS rows at a time, each row's pair of activations broadcast.
#if BITCLIFF_AVX512
constexpr int INT_TILE_VECTORS = 4;  // zmm vectors of 16 columns per tile: 64 columns
constexpr int64_t INT_TILE_BLOCKS = INT_TILE_VECTORS * 16 / BLOCK;
constexpr int INT_TILE_ROWS = 6;     // 6 rows x 4 vectors = 24 int32 accumulators, 4 panel vectors, 1 broadcast
#endif
// Rows from which the AVX-512 build multiplies through gemm_int rather than gemv_int (2-core Xeon,
// W4 g128, interleaved: gemv_int 1.5-2x faster at one row, level at two, gemm_int 1.2-1.5x faster
// at four and 1.4-2.9x faster than the fp32 gemv at 5-16 rows).  Both give the same bytes.
constexpr int64_t INT_GEMM_MIN_ROWS = 2;
#if BITCLIFF_AVX512

// The panel of group g for column blocks [first_block, first_block + n_blocks): panel[p * ld + c]
// holds the int16 codes minus zero of positions 2p (low half) and 2p + 1 (high half) of column c.
template <int BITS>
void pack_pairs(const Weight& w, int64_t first_block, int64_t n_blocks, int64_t g, int32_t* panel, int64_t ld) {
  const int64_t block_words = w.groups * w.wpg * BLOCK;
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t block = first_block + b;
    const __m256i z = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(w.zeros + (block * w.groups + g) * BLOCK)));
    const __m256i zz = _mm256_or_si256(z, _mm256_slli_epi32(z, 16));  // z in both halves
    const __m256i* word = (const __m256i*)(w.words + block * block_words + g * w.wpg * BLOCK);
    int32_t* column = panel + b * BLOCK;
    if constexpr (BITS == 3) {
      for (int64_t j = 0; j < w.wpg / 3; ++j) {
        const __m256i low0 = _mm256_loadu_si256(word + 3 * j), low1 = _mm256_loadu_si256(word + 3 * j + 1);
        const __m256i high = _mm256_loadu_si256(word + 3 * j + 2);
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) {
          const __m256i pair = _mm256_or_si256(plane_code(low0, low1, high, 2 * i),
                                               _mm256_slli_epi32(plane_code(low0, low1, high, 2 * i + 1), 16));
          _mm256_storeu_si256((__m256i*)(column + (j * 16 + i) * ld), _mm256_sub_epi16(pair, zz));
        }
      }
    } else {
      constexpr int CPW = 32 / BITS;
      for (int64_t j = 0; j < w.wpg; ++j) {
        const __m256i codes = _mm256_loadu_si256(word + j);
#pragma GCC unroll 8
        for (int i = 0; i < CPW / 2; ++i) {
          const __m256i pair = _mm256_or_si256(word_code<BITS>(codes, 2 * i),
                                               _mm256_slli_epi32(word_code<BITS>(codes, 2 * i + 1), 16));
          _mm256_storeu_si256((__m256i*)(column + (j * CPW / 2 + i) * ld), _mm256_sub_epi16(pair, zz));
        }
      }
    }
  }
}

// y[row0 .. row0 + ROWS, the tile's VECS * 16 columns] += s * d * (q . panel) for one group (the
// first group stores instead of adding).  xq points at the group's first position of row0, `step`
// at row0's step of the group; `last` masks the columns of the last vector that exist.
template <int ROWS, int VECS>
void int_rows(const int32_t* panel, int64_t pairs, int64_t ld, const int16_t* xq, int64_t x_stride,
              const float* step, int64_t step_stride, const float* scale, float* y, int64_t y_stride,
              __mmask16 last, bool first) {
  // One named accumulator per row and vector: with an array of them (loops unrolled or not) GCC
  // stored all 24 to the stack at every step.
#define BITCLIFF_ACC(R, V) __m512i acc##R##V = _mm512_setzero_si512();
#define BITCLIFF_ROW(R) BITCLIFF_ACC(R, 0) BITCLIFF_ACC(R, 1) BITCLIFF_ACC(R, 2) BITCLIFF_ACC(R, 3)
  BITCLIFF_ROW(0) BITCLIFF_ROW(1) BITCLIFF_ROW(2) BITCLIFF_ROW(3) BITCLIFF_ROW(4) BITCLIFF_ROW(5)
#undef BITCLIFF_ROW
#undef BITCLIFF_ACC
  static_assert(ROWS <= 6 && VECS <= 4, "int_rows has 6 x 4 accumulators");
  // Two pairs per pass (a group has an even number of pairs): one pass a pair ran at about half
  // the rate in a loop of its own on this data.
#pragma GCC unroll 2
  for (int64_t p = 0; p < pairs; ++p) {
    const int32_t* row = panel + p * ld;
    const __m512i b0 = _mm512_loadu_si512(row);
    const __m512i b1 = VECS > 1 ? _mm512_loadu_si512(row + 16) : b0;
    const __m512i b2 = VECS > 2 ? _mm512_loadu_si512(row + 32) : b0;
    const __m512i b3 = VECS > 3 ? _mm512_loadu_si512(row + 48) : b0;
#define BITCLIFF_DOT(R)                                                                       \
    if constexpr (R < ROWS) {                                                                 \
      int32_t both;                                                                           \
      std::memcpy(&both, xq + R * x_stride + 2 * p, sizeof both);                             \
      const __m512i a = _mm512_set1_epi32(both);                                              \
      acc##R##0 = _mm512_dpwssd_epi32(acc##R##0, a, b0);                                      \
      if constexpr (VECS > 1) acc##R##1 = _mm512_dpwssd_epi32(acc##R##1, a, b1);              \
      if constexpr (VECS > 2) acc##R##2 = _mm512_dpwssd_epi32(acc##R##2, a, b2);              \
      if constexpr (VECS > 3) acc##R##3 = _mm512_dpwssd_epi32(acc##R##3, a, b3);              \
    }
    BITCLIFF_DOT(0) BITCLIFF_DOT(1) BITCLIFF_DOT(2) BITCLIFF_DOT(3) BITCLIFF_DOT(4) BITCLIFF_DOT(5)
#undef BITCLIFF_DOT
  }
  const __m512i sums[6][4] = {{acc00, acc01, acc02, acc03}, {acc10, acc11, acc12, acc13},
                              {acc20, acc21, acc22, acc23}, {acc30, acc31, acc32, acc33},
                              {acc40, acc41, acc42, acc43}, {acc50, acc51, acc52, acc53}};
  for (int r = 0; r < ROWS; ++r) {
    const __m512 d = _mm512_set1_ps(step[r * step_stride]);
    for (int v = 0; v < VECS; ++v) {
      const __mmask16 m = v == VECS - 1 ? last : (__mmask16)0xFFFF;
      float* out = y + r * y_stride + v * 16;
      const __m512 t = _mm512_mul_ps(_mm512_loadu_ps(scale + v * 16), d);
      const __m512 before = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m, out);
      _mm512_mask_storeu_ps(out, m, _mm512_fmadd_ps(t, _mm512_cvtepi32_ps(sums[r][v]), before));
    }
  }
}

template <int VECS>
void int_all_rows(const int32_t* panel, int64_t pairs, int64_t ld, const int16_t* xq, int64_t rows,
                  int64_t x_stride, const float* step, int64_t groups, const float* scale, float* y,
                  int64_t y_stride, __mmask16 last, bool first) {
  int64_t r0 = 0;
  for (; r0 + INT_TILE_ROWS <= rows; r0 += INT_TILE_ROWS)
    int_rows<INT_TILE_ROWS, VECS>(panel, pairs, ld, xq + r0 * x_stride, x_stride, step + r0 * groups, groups,
                                  scale, y + r0 * y_stride, y_stride, last, first);
  switch (rows - r0) {
#define BITCLIFF_ROWS(R) \
    case R: int_rows<R, VECS>(panel, pairs, ld, xq + r0 * x_stride, x_stride, step + r0 * groups, groups, scale, \
                              y + r0 * y_stride, y_stride, last, first); break;
    BITCLIFF_ROWS(1) BITCLIFF_ROWS(2) BITCLIFF_ROWS(3) BITCLIFF_ROWS(4) BITCLIFF_ROWS(5)
#undef BITCLIFF_ROWS
    default: break;
  }
}

// y [rows, blocks * BLOCK] = xq [groups, rows, per_group] (int16, steps [rows, groups]) times the weight.
template <int BITS>
void gemm_int_tiles(const int16_t* xq, const float* step, int64_t rows, const Weight& w, int64_t blocks, float* y) {
  const int64_t pairs = w.per_group / 2, ld = INT_TILE_VECTORS * 16;
  const int64_t tiles = (blocks + INT_TILE_BLOCKS - 1) / INT_TILE_BLOCKS, y_stride = blocks * BLOCK;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> panel(pairs * ld, 0);
    std::vector<float> scale(ld, 0.0f);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t first_block = t * INT_TILE_BLOCKS, n_blocks = std::min(INT_TILE_BLOCKS, blocks - first_block);
      const int vecs = (int)((n_blocks * BLOCK + 15) / 16);
      const __mmask16 last = (n_blocks * BLOCK) % 16 ? (__mmask16)0x00FF : (__mmask16)0xFFFF;
      for (int64_t g = 0; g < w.groups; ++g) {
        pack_pairs<BITS>(w, first_block, n_blocks, g, panel.data(), ld);
        for (int64_t b = 0; b < n_blocks; ++b)
          _mm256_storeu_ps(scale.data() + b * BLOCK, _mm256_cvtph_ps(_mm_loadu_si128(
                                                         (const __m128i*)(w.scales + ((first_block + b) * w.groups + g) * BLOCK))));
        const int16_t* x_group = xq + g * rows * w.per_group;
        float* y_tile = y + first_block * BLOCK;
        switch (vecs) {
#define BITCLIFF_VECS(V) \
          case V: int_all_rows<V>(panel.data(), pairs, ld, x_group, rows, w.per_group, step + g, w.groups, scale.data(), \
                                  y_tile, y_stride, last, g == 0); break;
          BITCLIFF_VECS(1) BITCLIFF_VECS(2) BITCLIFF_VECS(3) BITCLIFF_VECS(4)
#undef BITCLIFF_VECS
          default: break;
        }
      }
    }
  });
}

// The activations at the weight's positions as int16, rounded per group (round_group): xq [groups,
// rows, per_group], group-major so that the rows' values of one group, which a tile reads in
// turn, are one stream; step [rows, groups]; padding positions hold zeros.
void round_positions_int16(const at::Tensor& x, const at::Tensor* columns, int64_t groups, int64_t per_group,
                           at::Tensor& xq, at::Tensor& step) {
  const int64_t rows = x.size(0), k = x.size(1);
  const int64_t* column = columns ? columns->data_ptr<int64_t>() : nullptr;
  const float* src = x.data_ptr<float>();
  int16_t* out = xq.data_ptr<int16_t>();
  float* steps = step.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> values(per_group);
    std::vector<int32_t> q(per_group);
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t g = 0; g < groups; ++g) {
        for (int64_t i = 0; i < per_group; ++i) values[i] = at_position(src + r * k, column, k, g * per_group + i);
        int32_t total;
        steps[r * groups + g] = round_group(values.data(), per_group, q.data(), &total);
        for (int64_t i = 0; i < per_group; ++i) out[(g * rows + r) * per_group + i] = (int16_t)q[i];
      }
    }
  });
}

at::Tensor gemm_int(const at::Tensor& x2, const at::Tensor* columns, const Weight& w, int64_t bits, int64_t blocks) {
  const int64_t rows = x2.size(0);
  at::Tensor xq = at::empty({w.groups, rows, w.per_group}, x2.options().dtype(at::kShort));
  at::Tensor step = at::empty({rows, w.groups}, x2.options());
  round_positions_int16(x2, columns, w.groups, w.per_group, xq, step);
  at::Tensor y = at::empty({rows, blocks * BLOCK}, x2.options());
  const int16_t* xp = xq.data_ptr<int16_t>();
  const float* sp = step.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  switch (bits) {
    case 2: gemm_int_tiles<2>(xp, sp, rows, w, blocks, yp); break;
    case 3: gemm_int_tiles<3>(xp, sp, rows, w, blocks, yp); break;
    default: gemm_int_tiles<4>(xp, sp, rows, w, blocks, yp); break;
  }
  return y;
}
#endif

template <int BITS>
void dequantize_groups(const Weight& w, int64_t blocks, int64_t first_group, int64_t end_group, float* out) {
  // whole tiles per call: each row's cache lines then fill in turn (see dequantize_blocks)
  at::parallel_for(0, blocks, TILE_BLOCKS, [&](int64_t begin, int64_t end) {
    dequantize_blocks<BITS>(w, begin, end - begin, first_group, end_group, out + begin * BLOCK, blocks * BLOCK);
  });
}

// y [rows, blocks * BLOCK] = xk [rows, positions] @ dequant(W) for many rows, in tiles that stay in
// each core's cache: every thread owns tiles of TILE_BLOCKS column blocks, and for each tile it
// dequantizes one slab of K positions at a time (whole groups, at most slab_bytes of fp32) into a
// buffer of its own and hands it to the BLAS, `y[:, tile] += xk[:, slab] @ buffer` (inside the
// parallel region the BLAS runs on the calling thread alone: the threads share nothing).  The dense
// weight never reaches memory, and each tile of y is summed while it is in cache.  Against the
// earlier schedule (slabs of all N columns, 16 MiB, the BLAS on all threads, each block's column
// dequantized on its own), on a 2-core Xeon, 4096 x 14336 and 14336 x 4096, W4, in separate runs
// of a noisy machine (not interleaved): 0.5-0.6x the time at M = 64 and 0.7-0.9x at M = 512.
template <int BITS>
void gemm_tiles(const at::Tensor& xk, const Weight& w, int64_t blocks, int64_t slab_bytes, at::Tensor& y) {
  const int64_t tile_columns = TILE_BLOCKS * BLOCK, per_group = w.per_group;
  const int64_t group_bytes = per_group * tile_columns * (int64_t)sizeof(float);
  const int64_t slab_groups = std::max<int64_t>(1, std::min<int64_t>(w.groups, slab_bytes / group_bytes));
  const int64_t tiles = (blocks + TILE_BLOCKS - 1) / TILE_BLOCKS;
  // Grad and inference mode are per thread: the pool's threads take the caller's (its no-grad
  // guard, a model's inference_mode), without which at::mm_out refuses the output.
  const at::ThreadLocalState caller;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard same_as_caller(caller);
    at::Tensor buffer = at::empty({slab_groups * per_group, tile_columns}, xk.options());
    for (int64_t t = begin; t < end; ++t) {
      const int64_t first_block = t * TILE_BLOCKS, tile_blocks = std::min(TILE_BLOCKS, blocks - first_block);
      at::Tensor out = y.narrow(1, first_block * BLOCK, tile_blocks * BLOCK);
      for (int64_t g0 = 0; g0 < w.groups; g0 += slab_groups) {
        const int64_t g1 = std::min(w.groups, g0 + slab_groups), length = (g1 - g0) * per_group;
        dequantize_blocks<BITS>(w, first_block, tile_blocks, g0, g1, buffer.data_ptr<float>(), tile_columns);
        const at::Tensor part = xk.narrow(1, g0 * per_group, length);
        const at::Tensor slab = buffer.narrow(0, 0, length).narrow(1, 0, tile_blocks * BLOCK);
        if (g0 == 0) {
          at::mm_out(out, part, slab);
        } else {
          out.addmm_(part, slab);
        }
      }
    }
  });
}

at::Tensor gemm(const at::Tensor& xk, const Weight& w, int64_t bits, int64_t blocks, int64_t slab_bytes) {
  at::Tensor y = at::empty({xk.size(0), blocks * BLOCK}, xk.options());
  switch (bits) {
    case 2: gemm_tiles<2>(xk, w, blocks, slab_bytes, y); break;
    case 3: gemm_tiles<3>(xk, w, blocks, slab_bytes, y); break;
    default: gemm_tiles<4>(xk, w, blocks, slab_bytes, y); break;
  }
  return y;
}

// y [..., N] = x [..., K] @ dequant(W)ᵀ (+ bias), in x's dtype (computed in fp32): the grouped
// form for up to gemv_max_rows rows, slabs of at most slab_bytes of dequantized weight above.
// With integer_activations, against weights with groups of at most INT_MAX_POSITIONS positions,
// x is rounded to 15 bits per group and multiplied as integers: by gemm_int from INT_GEMM_MIN_ROWS
// rows on in the AVX-512 build, else by the grouped form's integer variant (gemv_int_tile) up to
// INT_MAX_ROWS rows.
at::Tensor linear(const at::Tensor& x, const at::Tensor& words, const at::Tensor& scales, const at::Tensor& zeros,
                  const c10::optional<at::Tensor>& columns, const c10::optional<at::Tensor>& bias, int64_t bits,
                  int64_t in_features, int64_t out_features, int64_t gemv_max_rows, int64_t slab_bytes,
                  bool integer_activations) {
  // The operator has no derivative; its inner ATen calls record none either (at::mm_out refuses an
  // operand that requires grad, as the activations of a model run outside no_grad do).
  const at::NoGradGuard no_grad;
  const Weight w = check_weight(words, scales, zeros, bits);
  const int64_t blocks = words.size(0), positions = w.groups * w.per_group;
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "x must be [..., K] with K > 0");
  TORCH_CHECK(out_features > 0 && out_features <= blocks * BLOCK && out_features > (blocks - 1) * BLOCK,
              "out_features ", out_features, " does not fit ", blocks, " column blocks");
  TORCH_CHECK(slab_bytes >= 1, "slab_bytes must be positive, got ", slab_bytes);
  const int64_t k = x.size(-1);
  TORCH_CHECK(k == in_features, "x has ", k, " features, the weight ", in_features);
  if (columns.has_value()) {
    TORCH_CHECK(columns->dtype() == at::kLong && columns->dim() == 1 && columns->numel() == positions &&
                    columns->is_contiguous(), "columns must be contiguous int64 [", positions, "]");
    TORCH_CHECK(columns->numel() == 0 || (columns->min().item<int64_t>() >= 0 && columns->max().item<int64_t>() <= k),
                "columns must lie in [0, ", k, "]");
  } else {
    TORCH_CHECK(k <= positions, "x has ", k, " features, the weight ", positions, " positions");
  }
  const at::Tensor x2 = x.reshape({-1, k}).to(at::kFloat).contiguous();
  const int64_t rows = x2.size(0);
  at::Tensor y;
  const bool integer = integer_activations && w.per_group <= INT_MAX_POSITIONS;
  if (BITCLIFF_AVX512 && integer && rows >= INT_GEMM_MIN_ROWS) {
#if BITCLIFF_AVX512
    y = gemm_int(x2, columns.has_value() ? &columns.value() : nullptr, w, bits, blocks);
#endif
  } else if (integer && rows <= std::min(gemv_max_rows, INT_MAX_ROWS)) {
    const int64_t units = positions / unit_positions((int)bits);
    at::Tensor bytes = at::empty({rows, units, 2, vectors((int)bits)}, x2.options().dtype(at::kInt));
    at::Tensor step = at::empty({rows, w.groups}, x2.options());
    at::Tensor sum = at::empty({rows, w.groups}, x2.options().dtype(at::kInt));
    round_positions(x2, columns.has_value() ? &columns.value() : nullptr, bits, w.groups, w.per_group, bytes, step,
                    sum);
    const IntActivations a{bytes.data_ptr<int32_t>(), step.data_ptr<float>(), sum.data_ptr<int32_t>(), units};
    y = at::empty({rows, blocks * BLOCK}, x2.options());
    switch (bits) {
      case 2: gemv_int_all<2>(w, a, positions, rows, blocks, y.data_ptr<float>()); break;
      case 3: gemv_int_all<3>(w, a, positions, rows, blocks, y.data_ptr<float>()); break;
      default: gemv_int_all<4>(w, a, positions, rows, blocks, y.data_ptr<float>()); break;
    }
  } else if (rows <= gemv_max_rows) {
    at::Tensor xk = at::empty({rows, positions}, x2.options());
    at::Tensor xsum = at::empty({rows, w.groups}, x2.options());
    gather_positions(x2, columns.has_value() ? &columns.value() : nullptr, bits, w.groups, xk, xsum);
    y = at::empty({rows, blocks * BLOCK}, x2.options());
    const float *xp = xk.data_ptr<float>(), *sp = xsum.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    switch (bits) {
      case 2: gemv_all<2>(w, xp, sp, positions, rows, blocks, yp); break;
      case 3: gemv_all<3>(w, xp, sp, positions, rows, blocks, yp); break;
      default: gemv_all<4>(w, xp, sp, positions, rows, blocks, yp); break;
    }
  } else {  // many rows: the gather is a small part of the work, torch's vectorised ops do it
    at::Tensor xk = x2;
    if (columns.has_value()) {
      xk = at::cat({x2, at::zeros({rows, 1}, x2.options())}, 1).index_select(1, columns.value());
    } else if (positions != k) {
      xk = at::constant_pad_nd(x2, {0, positions - k});
    }
    y = gemm(xk, w, bits, blocks, slab_bytes);
  }
  if (out_features != blocks * BLOCK) y = y.narrow(1, 0, out_features);
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == out_features, "bias has ", bias->numel(), " values, expected ", out_features);
    y = y + bias->to(at::kFloat);
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return y.to(x.scalar_type()).reshape(shape);
}

// The dense fp32 weight [positions, blocks * BLOCK] (tests and the reference comparison).
at::Tensor dequantize(const at::Tensor& words, const at::Tensor& scales, const at::Tensor& zeros, int64_t bits) {
  const Weight w = check_weight(words, scales, zeros, bits);
  const int64_t blocks = words.size(0), positions = w.groups * w.per_group;
  at::Tensor out = at::empty({positions, blocks * BLOCK}, at::TensorOptions().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  switch (bits) {
    case 2: dequantize_groups<2>(w, blocks, 0, w.groups, op); break;
    case 3: dequantize_groups<3>(w, blocks, 0, w.groups, op); break;
    default: dequantize_groups<4>(w, blocks, 0, w.groups, op); break;
  }
  return out;
}

// y [rows, N] = x [rows, K] @ Wᵀ for a bf16 weight W [N, K] (nn.Linear's layout) and fp32 x, in
// fp32: each bf16 weight widens to fp32 exactly (its 16 bits become the top half of a float), so
// the products are exact and only the summation order differs from `x @ W.float().T`.  For the
// few rows of a decode step, where the weight's bytes set the speed (the unembedding): lanes run
// along K, so x is read as vectors and never broadcast, and the OUTS outputs of a tile share each
// read of x.
//
// 16 weights widen with two unpacks against zero, which interleave within each 128-bit half:
// the low unpack holds weights 0-3 and 8-11 of the 16, the high one 4-7 and 12-15.  x is read in
// that order (`ordered`, permuted once per call by bf16_order), so each product pairs the right terms.
constexpr int SPAN = 16;  // weights per load

// ordered [rows, K16]: each row's first K16 = K - K % 16 values of x in the unpacks' order.
void bf16_order(const float* x, int64_t rows, int64_t k, float* ordered) {
  const int64_t k16 = k / SPAN * SPAN;
  constexpr int order[SPAN] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < k16; i += SPAN)
      for (int j = 0; j < SPAN; ++j) ordered[r * k16 + i + j] = x[r * k + i + order[j]];
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <int ROWS, int OUTS>
void bf16_tile(const uint16_t* w, const float* x, const float* ordered, int64_t k, int64_t n0, int64_t outs,
               float* y, int64_t n) {
  const int64_t k16 = k / SPAN * SPAN;
  float sums[ROWS][OUTS] = {};
#if BITCLIFF_AVX2
  __m256 acc[ROWS][OUTS][2];
  for (int r = 0; r < ROWS; ++r)
    for (int o = 0; o < OUTS; ++o) acc[r][o][0] = acc[r][o][1] = _mm256_setzero_ps();
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t i = 0; i < k16; i += SPAN) {
    __m256 lo[OUTS], hi[OUTS];
    for (int o = 0; o < OUTS; ++o) {
      const int64_t row = n0 + (o < outs ? o : 0);  // a short tile repeats its first output, never stored
      const __m256i h = _mm256_loadu_si256((const __m256i*)(w + row * k + i));
      lo[o] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, h));
      hi[o] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, h));
    }
    for (int r = 0; r < ROWS; ++r) {
      const __m256 x_lo = _mm256_loadu_ps(ordered + r * k16 + i), x_hi = _mm256_loadu_ps(ordered + r * k16 + i + 8);
      for (int o = 0; o < OUTS; ++o) {
        acc[r][o][0] = _mm256_fmadd_ps(x_lo, lo[o], acc[r][o][0]);
        acc[r][o][1] = _mm256_fmadd_ps(x_hi, hi[o], acc[r][o][1]);
      }
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    for (int o = 0; o < OUTS; ++o) {  // the 8 lanes' sum, in registers (a store and 8 loads stall)
      const __m256 both = _mm256_add_ps(acc[r][o][0], acc[r][o][1]);
      __m128 v = _mm_add_ps(_mm256_castps256_ps128(both), _mm256_extractf128_ps(both, 1));
      v = _mm_add_ps(v, _mm_movehl_ps(v, v));
      sums[r][o] = _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
    }
  }
#else
  for (int r = 0; r < ROWS; ++r)
    for (int o = 0; o < outs; ++o)
      for (int64_t i = 0; i < k16; ++i) sums[r][o] += x[r * k + i] * bf16_to_float(w[(n0 + o) * k + i]);
#endif
  for (int r = 0; r < ROWS; ++r) {
    for (int o = 0; o < outs; ++o) {
      float sum = sums[r][o];
      for (int64_t i = k16; i < k; ++i) sum += x[r * k + i] * bf16_to_float(w[(n0 + o) * k + i]);
      y[r * n + n0 + o] = sum;
    }
  }
}

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(weight.dtype() == at::kBFloat16 && weight.dim() == 2 && weight.is_contiguous(),
              "weight must be contiguous bf16 [N, K]");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), "x must be [..., ", weight.size(1), "]");
  const int64_t k = weight.size(1), n = weight.size(0);
  const at::Tensor x2 = x.reshape({-1, k}).to(at::kFloat).contiguous();
  const int64_t rows = x2.size(0);
  at::Tensor y = at::empty({rows, n}, x2.options());
  const uint16_t* w = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  const float* xp = x2.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::Tensor ordered = at::empty({rows, k / SPAN * SPAN}, x2.options());
  bf16_order(xp, rows, k, ordered.data_ptr<float>());
  const float* op = ordered.data_ptr<float>();  // x in the unpacks' order
  const int64_t k16 = k / SPAN * SPAN;
  // One row: one output per tile where rows are short (K = 576: 5.4 against 7.3 ms for four, on
  // 49152 x 576), four where they are long (K = 4096: 22.7 against 33.4 ms); two rows: two.
  const int64_t tile = rows == 1 ? (k < 2048 ? 1 : 4) : 2;
  const int64_t tiles = (n + tile - 1) / tile;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, k * tile));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * tile, outs = std::min<int64_t>(tile, n - n0);
      if (rows == 1) {
        if (tile == 1) {
          bf16_tile<1, 1>(w, xp, op, k, n0, outs, yp, n);
        } else {
          bf16_tile<1, 4>(w, xp, op, k, n0, outs, yp, n);
        }
        continue;
      }
      for (int64_t r0 = 0; r0 < rows; r0 += 2) {
        if (rows - r0 >= 2) {
          bf16_tile<2, 2>(w, xp + r0 * k, op + r0 * k16, k, n0, outs, yp + r0 * n, n);
        } else {
          bf16_tile<1, 2>(w, xp + r0 * k, op + r0 * k16, k, n0, outs, yp + r0 * n, n);
        }
      }
    }
  });
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return y.to(x.scalar_type()).reshape(shape);
}

// Which instruction set this build runs (the loader reports it once).
std::string isa() { return BITCLIFF_AVX512 ? "avx512" : (BITCLIFF_AVX2 ? "avx2" : "portable"); }

// Whether rows above gemv_max_rows take integer activations too (gemm_int: the AVX-512 build).
bool integer_gemm() { return BITCLIFF_AVX512; }

// How many threads the kernel's at::parallel_for loops run on, as torch's setting now stands: 1
// where the build lacks OpenMP (the loops then compile to plain loops, on one core).
int64_t parallel_threads() {
  std::atomic<uint64_t> seen{0};
  at::parallel_for(0, 64, 1, [&](int64_t, int64_t) { seen |= uint64_t{1} << (at::get_thread_num() % 64); });
  return __builtin_popcountll(seen.load());
}

// The constants the Python side mirrors for the layout and the rounding reference (cpu_packed.py):
// the loader refuses a build whose constants differ from them.
std::vector<int64_t> constants() { return {BLOCK, ACT_LEVELS, INT_MAX_POSITIONS, INT_MAX_ROWS}; }

}  // namespace

TORCH_LIBRARY(bitcliff_cpu, m) {
  m.def("linear(Tensor x, Tensor words, Tensor scales, Tensor zeros, Tensor? columns, Tensor? bias, int bits, "
        "int in_features, int out_features, int gemv_max_rows, int slab_bytes, bool integer_activations) -> Tensor");
  m.def("dequantize(Tensor words, Tensor scales, Tensor zeros, int bits) -> Tensor");
  m.def("linear_bf16(Tensor x, Tensor weight) -> Tensor");
  m.def("isa() -> str", &isa);
  m.def("integer_gemm() -> bool", &integer_gemm);
  m.def("parallel_threads() -> int", &parallel_threads);
  m.def("constants() -> int[]", &constants);
}

TORCH_LIBRARY_IMPL(bitcliff_cpu, CPU, m) {
  m.impl("linear", &linear);
  m.impl("dequantize", &dequantize);
  m.impl("linear_bf16", &linear_bf16);
}
