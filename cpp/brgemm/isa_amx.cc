// AMX path (compiled with AVX-512 plus -mamx-tile -mamx-bf16): bfloat16 inputs through the
// tile unit. One TDPBF16PS multiplies a 16 x 32 tile of A by a 32 x 16 tile of B (held as
// 16 pair-rows, the layout of pack_b_vnni) into a 16 x 16 float32 tile of C: 16384 flops,
// ~15x what the FMA units do in the same time here.
//
// Register blocking: 2 x 2 C tiles (32 x 32 of C) in tiles 0-3, two A tiles (4, 5) and two
// B tiles (6, 7); every tile has one shape per kernel (rows = min(m, 16), 64 bytes), so the
// tile configuration is loaded once per thread and kept while kernels share it. Edges need
// no other shapes: the last row tile of m >= 16 rows overlaps the one before it (its rows
// go through the epilogue once), B is padded with zeros to whole tiles, and the last
// partial 32-column chunk of A is copied into a zero-padded tile.
//
// Float32 C with beta 0 or 1 and nothing else to apply goes straight between C and the
// tiles; otherwise finished tiles are stored to a small float buffer and finish_tile
// (alpha, beta * C, bias, the shared activation math, float32 or bfloat16 store) runs on
// them from L1. Float32 inputs on this ISA use the AVX-512 kernels (dispatch.cc).
#define JBR_VEC_AVX512
#define JBR_ISA_NS amx
#define JBR_MAX_VECTORS 4
#define JBR_MAX_ROWS {0, 16, 14, 9, 7}
#define JBR_MAX_ROWS_BF16 {0, 16, 13, 8, 6}
#include "kernel_impl.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace jbr {
namespace amx {

constexpr int kTileRows = 16;  // rows of an A or C tile; pair-rows of a B tile
constexpr int kTileK = 32;     // bfloat16 elements of A per tile row (64 bytes)
constexpr int kTileCols = 16;  // float32 columns of a C tile

// The 64-byte operand of LDTILECFG.
struct TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64);

// Loads the configuration for `rows`-row A and C tiles unless this thread already has it
// (another library may have changed it since our last call: compare, do not assume).
void configure_tiles(int rows) {
  TileConfig want;
  for (int t = 0; t < 8; ++t) {
    want.colsb[t] = 64;
    want.rows[t] = static_cast<uint8_t>(t >= 6 ? kTileRows : rows);
  }
  alignas(64) TileConfig have;
  _tile_storeconfig(&have);
  if (std::memcmp(&have, &want, sizeof want) != 0) _tile_loadconfig(&want);
}

// rows x (k_tail < 32) elements of A copied into a zero-padded tile (kTileK per row).
void pad_a_tail(const uint16_t* a, int64_t lda, int rows, int64_t k_tail, uint16_t* tile) {
  const __mmask32 mask = static_cast<__mmask32>((uint64_t{1} << k_tail) - 1);
  for (int r = 0; r < rows; ++r)
    _mm512_store_si512(tile + r * kTileK, _mm512_maskz_loadu_epi16(mask, a + r * lda));
}

struct Blocks {
  const uint16_t* const* a;  // A_i, already offset to the first row of the call
  const uint16_t* const* b;  // B_i in the VNNI layout
  int64_t count, lda, k;
  int64_t b_tile_ld;         // elements between B's 16-column tiles
};

// Where a C tile starts and ends: it is loaded from (load) or zeroed, accumulates the
// batch, and is stored to dst (stride bytes apart): C itself where the epilogue has nothing
// to do, else a float buffer the epilogue reads.
struct CTile {
  float* dst;
  int64_t stride;
  bool load;
};

// (The tile intrinsics take the tile number as a literal: one line per tile.)
#define JBR_START_TILE(T, ctile) \
  do {                                                  \
    if ((ctile).load) _tile_loadd(T, (ctile).dst, (ctile).stride); \
    else _tile_zero(T);                                 \
  } while (0)

// One block of ROW_TILES x COL_TILES C tiles (tile 2 * r + c: row tile r, column tile c),
// rows row0[r] and columns col0..: the whole batch accumulated in tiles 0-3.
template <int ROW_TILES, int COL_TILES>
void tile_block(const Blocks& bl, const int64_t* row0, int rows, int64_t col0, const CTile* c) {
  alignas(64) uint16_t tail[2][kTileRows * kTileK];
  const int64_t full_chunks = bl.k / kTileK, k_tail = bl.k % kTileK;
  const int64_t lda_bytes = bl.lda * 2, b_stride = 2 * kTileCols * 2;  // a tile's pair-rows: 64 bytes
  JBR_START_TILE(0, c[0]);
  if constexpr (COL_TILES == 2) JBR_START_TILE(1, c[1]);
  if constexpr (ROW_TILES == 2) JBR_START_TILE(2, c[2]);
  if constexpr (ROW_TILES == 2 && COL_TILES == 2) JBR_START_TILE(3, c[3]);
  for (int64_t i = 0; i < bl.count; ++i) {
    const uint16_t* a0 = bl.a[i] + row0[0] * bl.lda;
    const uint16_t* a1 = bl.a[i] + row0[ROW_TILES - 1] * bl.lda;
    const uint16_t* b = bl.b[i] + col0 / kTileCols * bl.b_tile_ld;
    for (int64_t kc = 0; kc <= full_chunks; ++kc) {
      const uint16_t* b_chunk = b + kc * kTileRows * 2 * kTileCols;
      if (kc < full_chunks) {
        _tile_loadd(4, a0 + kc * kTileK, lda_bytes);
        if constexpr (ROW_TILES == 2) _tile_loadd(5, a1 + kc * kTileK, lda_bytes);
      } else {
        if (k_tail == 0) break;
        pad_a_tail(a0 + kc * kTileK, bl.lda, rows, k_tail, tail[0]);
        _tile_loadd(4, tail[0], kTileK * 2);
        if constexpr (ROW_TILES == 2) {
          pad_a_tail(a1 + kc * kTileK, bl.lda, rows, k_tail, tail[1]);
          _tile_loadd(5, tail[1], kTileK * 2);
        }
      }
      _tile_loadd(6, b_chunk, b_stride);
      _tile_dpbf16ps(0, 4, 6);
      if constexpr (COL_TILES == 2) {
        _tile_loadd(7, b_chunk + bl.b_tile_ld, b_stride);
        _tile_dpbf16ps(1, 4, 7);
      }
      if constexpr (ROW_TILES == 2) {
        _tile_dpbf16ps(2, 5, 6);
        if constexpr (COL_TILES == 2) _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
  _tile_stored(0, c[0].dst, c[0].stride);
  if constexpr (COL_TILES == 2) _tile_stored(1, c[1].dst, c[1].stride);
  if constexpr (ROW_TILES == 2) _tile_stored(2, c[2].dst, c[2].stride);
  if constexpr (ROW_TILES == 2 && COL_TILES == 2) _tile_stored(3, c[3].dst, c[3].stride);
}

using BlockFn = void (*)(const Blocks&, const int64_t*, int, int64_t, const CTile*);
constexpr BlockFn kBlockFns[2][2] = {{&tile_block<1, 1>, &tile_block<1, 2>},
                                     {&tile_block<2, 1>, &tile_block<2, 2>}};

// The epilogue on rows [first, rows) of a finished 16 x 16 tile (row0, col0 of C): alpha,
// beta * C, bias, activation, one float32 or bfloat16 store per row. Its own loop rather
// than kernel_impl.h's per-vector finish(), which re-reads the descriptor's options and
// the bias for every row: with a bias and a bfloat16 result, 64x64x64 1.60 -> 1.16 us and
// 64x256x64 6.5 -> 4.6 us a call (single thread, same-window A/B, -O3).
void finish_tile(const Desc& d, const float* tile, int first, int rows, int64_t row0, int64_t col0,
                 void* c, float alpha, const float* bias) {
  const int valid = static_cast<int>(std::min<int64_t>(kTileCols, d.n - col0));
  const auto mask = Vec::tail_mask(valid);
  const Vec bias_v = d.has_bias ? Vec::load(bias + col0, mask) : Vec::zero();
  const Vec alpha_v = Vec::set1(alpha), beta_v = Vec::set1(d.beta);
  const bool scale = alpha != 1.0f, add_c = d.beta != 0.0f;
  const Activation act = d.activation;
  auto value = [&](int i, Vec old) {
    Vec x = Vec::load(tile + i * kTileCols);
    if (scale) x = x * alpha_v;
    if (add_c) x = fmadd(old, beta_v, x);
    return activate(x + bias_v, act);
  };
  if (d.c_dtype == DType::bf16) {
    uint16_t* out = static_cast<uint16_t*>(c) + row0 * d.ldc + col0;
    for (int i = first; i < rows; ++i) {
      const Vec old = add_c ? Vec::load_bf16(out + i * d.ldc, mask) : Vec::zero();
      value(i, old).store_bf16(out + i * d.ldc, mask);
    }
  } else {
    float* out = static_cast<float*>(c) + row0 * d.ldc + col0;
    for (int i = first; i < rows; ++i) {
      const Vec old = add_c ? Vec::load(out + i * d.ldc, mask) : Vec::zero();
      value(i, old).store(out + i * d.ldc, mask);
    }
  }
}

void run_amx(const Kernel& kern, const Batch& batch, void* c, float alpha, const float* bias) {
  const Desc& d = kern.desc;
  const int64_t count = batch.count;
  thread_local std::vector<const uint16_t*> a_blocks, b_blocks;
  thread_local std::vector<uint16_t> packed;
  a_blocks.resize(count), b_blocks.resize(count);
  for (int64_t i = 0; i < count; ++i) a_blocks[i] = block_a<uint16_t>(batch, i);
  int64_t b_tile_ld = d.ldb;
  if (d.b_vnni) {
    for (int64_t i = 0; i < count; ++i) b_blocks[i] = block_b<uint16_t>(batch, i);
  } else {  // plain B: packed here, once per call, for every row block of the call
    b_tile_ld = vnni_tile_ld(d.k);
    const int64_t size = vnni_elements(d.k, d.n);
    packed.resize(count * size);
    for (int64_t i = 0; i < count; ++i) {
      detail::pack_vnni_avx512(block_b<uint16_t>(batch, i), d.ldb, d.k, d.n, packed.data() + i * size, b_tile_ld);
      b_blocks[i] = packed.data() + i * size;
    }
  }
  const Blocks blocks{a_blocks.data(), b_blocks.data(), count, d.lda, d.k, b_tile_ld};

  const int rows = static_cast<int>(std::min<int64_t>(d.m, kTileRows));
  configure_tiles(rows);
  const int64_t row_tiles = (d.m + kTileRows - 1) / kTileRows;
  const int64_t col_tiles = (d.n + kTileCols - 1) / kTileCols;
  // (Desc::stream_c is not honoured: tiles finish 16 columns at a time, and a non-temporal
  // store of a half line (a bfloat16 tile row) flushes a partial write-combining buffer;
  // ResNet-50 layers with 12.8 MB bfloat16 results ran at 140-210 GFLOP/s with it.)
  // Float32 C with nothing to add but C itself (beta 0 or 1): whole tiles go straight to
  // and from C, and only edge tiles take the epilogue.
  const bool direct = detail::plain_f32_epilogue(d, alpha);
  alignas(64) float out[4][kTileRows * kTileCols];

  for (int64_t ct = 0; ct < col_tiles; ct += 2) {
    const int col_pair = static_cast<int>(std::min<int64_t>(2, col_tiles - ct));
    for (int64_t rt = 0; rt < row_tiles; rt += 2) {
      const int row_pair = static_cast<int>(std::min<int64_t>(2, row_tiles - rt));
      // The last row tile ends at m (overlapping its neighbour where m % 16 != 0).
      int64_t row0[2];
      int first[2];  // rows of the tile an earlier tile finished
      CTile tiles[4];
      for (int r = 0; r < row_pair; ++r) {
        row0[r] = std::min<int64_t>((rt + r) * kTileRows, d.m - rows);
        first[r] = static_cast<int>((rt + r) * kTileRows - row0[r]);
        for (int cc = 0; cc < col_pair; ++cc) {
          const int64_t col0 = (ct + cc) * kTileCols;
          if (direct && first[r] == 0 && col0 + kTileCols <= d.n) {
            tiles[2 * r + cc] = {static_cast<float*>(c) + row0[r] * d.ldc + col0, d.ldc * 4, d.beta == 1.0f};
          } else {
            tiles[2 * r + cc] = {out[2 * r + cc], kTileCols * 4, false};
          }
        }
      }
      kBlockFns[row_pair - 1][col_pair - 1](blocks, row0, rows, ct * kTileCols, tiles);
      for (int r = 0; r < row_pair; ++r)
        for (int cc = 0; cc < col_pair; ++cc)
          if (tiles[2 * r + cc].dst == out[2 * r + cc])  // (else stored to C directly)
            finish_tile(d, out[2 * r + cc], first[r], rows, row0[r], (ct + cc) * kTileCols, c, alpha, bias);
    }
  }
}

// Register-resident tile loop: TDPBF16PS into four accumulator tiles, 16384 flops each.
double tile_peak_gflops(double seconds) {
  configure_tiles(kTileRows);
  alignas(64) uint16_t ones[kTileRows * kTileK];
  std::fill(ones, ones + kTileRows * kTileK, uint16_t{0x3F80});
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, ones, 64);
  _tile_loadd(5, ones, 64);
  _tile_loadd(6, ones, 64);
  _tile_loadd(7, ones, 64);
  const double rate = rounds_per_second([] {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }, seconds);
  alignas(64) float sink[kTileRows * kTileCols];
  _tile_stored(0, sink, 64);
  volatile float keep = sink[0];
  (void)keep;
  return 4.0 * 2 * kTileRows * kTileK * kTileCols * rate * 1e-9;
}

}  // namespace amx

namespace detail {

bool amx_usable() {
  // Linux hands out the tile state only on request, once per process.
  static const bool usable = [] {
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16")) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
}

namespace {
IsaImpl make_amx_impl() {
  // Float32 inputs on this ISA run the AVX-512 kernels (see dispatch.cc); get_kernel sets
  // the tile blocking (no register-block table applies).
  IsaImpl impl;
  impl.run_bf16 = &amx::run_amx;
  impl.bf16_peak_gflops = &amx::tile_peak_gflops;
  impl.activation = &amx::apply_activation;
  impl.fma_peak_gflops = &amx::fma_peak_gflops;
  impl.rows = {&amx::rows_max, &amx::rows_exp, &amx::rows_scale, &amx::rows_sub_mul};
  return impl;
}
}  // namespace
const IsaImpl impl_amx = make_amx_impl();
}  // namespace detail
}  // namespace jbr
