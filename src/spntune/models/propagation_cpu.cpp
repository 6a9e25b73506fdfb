// Fused CPU kernels for one spatial-propagation step (CSPN / DySPN), forward and backward.
//
//   out[b,c,y,x] = sum_j nw[b,j,y,x] * h[b,c, clamp(y+dy_j), clamp(x+dx_j)]
//                + sw[b,y,x] * h[b,c,y,x] + aw[b,y,x] * h0[b,c,y,x]
//
// with the k*k-1 neighbour offsets (dy_j, dx_j) in row-major window order, centre skipped (the
// order of propagation.neighbour_offsets), and clamping = replicate padding. All tensors are
// contiguous NCHW; sw / aw may be null (zero weight).
//
// Optionally the neighbour weights come factored, as DySPN's do: nw_j = a_j * rs[ring(j)] with a
// [B, k*k-1, H, W] affinity shared by all steps and a per-step [B, R, H, W] ring scale (ring(j) =
// max(|dy_j|, |dx_j|) - 1). The product is formed in registers, never as a [B, k*k-1, H, W] tensor,
// and the backward returns the gradients of a and rs.
//
// Layout of the work: each OpenMP thread takes a contiguous block of output rows (b, y). It keeps
// padded copies of the 2r+1 source rows it needs in a small ring (one new row per output row), so
// every neighbour read is a plain unaligned vector load, borders included. A row is computed in
// chunks of one vector (SPN_VBYTES; the last chunk overlaps the one before instead of masking): a
// block of up to 8 channels sweeps the row chunk by chunk, accumulating all k*k-1 neighbours in
// registers, then the next block (window_row says why in this order). Each weight vector is loaded
// once per channel block, each output vector is stored once. For k = 3, 5, 7 the chunks at multiples
// of the vector go through stencil_block, which forms a row's 2r+1 column shifts from two aligned loads
// by lane shuffles; the last chunk of a row, other k and rows narrower than a vector take window_block.
// There the forward first copies the row's weights chunk-major into a small buffer (packed_row: the weight
// rows lie a multiple of 4 KB apart and would evict each other from L1), times DySPN's ring scale, asking for
// the rows a few ahead of the one it copies (pack_weights says why not a row ahead).
//
// The backward is a gather by output row too: grad_h of row y collects nw * g from the rows whose
// neighbours land on y (the replicate padding folded back onto the border), from zero-padded
// copies of those rows, so no two threads ever write the same element and no atomics are needed.
// Rows at least r from the top and bottom gather through stencil_block as well; for radius 1 on rows a whole
// number of vectors wide, those rows take the whole backward in one sweep instead (fused_backward_row3).
//
// Each output row asks for the rows the next one reads first from memory (RowPrefetch): in a burst where
// the step fits in the last-level cache, spread over the row's chunks where it does not; such a step also
// writes its outputs with non-temporal stores (spreads says why; with 32-byte vectors only where a row is
// written vector after vector, put says why).
//
// Built on first use by cpu_propagation.py (g++ -O3 -march=native -fopenmp) and called through
// ctypes, which releases the GIL. float and double entry points (double for gradcheck).

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

// Bytes per vector: one register where the CPU has AVX-512's 32 registers of 64 bytes, else 32 bytes (one
// AVX2 register). On the 2-core Zen 3 VM (AVX2, 16 registers of 32 bytes) 64-byte vectors take two
// registers each, so the 16 hold 8 (a block's 8 accumulators alone); one step at [4, 11, 192, 256], two
// runs, 64 -> 32 bytes: forward CSPN 7x7 12.7 -> 8.5 and 12.4 -> 7.9 ms, DySPN 7x7 16.4 -> 10.2 and
// 15.8 -> 8.5 ms, CSPN 3x3 about the same (it waited on its stores, see put); backward CSPN 3x3 8.2 -> 4.6
// and 8.8 -> 4.2 ms, CSPN 7x7 34.8 -> 17.8 and 34.5 -> 17.1 ms, DySPN 7x7 39.4 -> 13.7 and 39.2 -> 11.3 ms;
// the library built in 25 instead of 68 s. On the Zen 4 VM (AVX-512) 32 was the slower (README). Other
// CPUs are unmeasured.
#ifndef SPN_VBYTES
#if defined(__AVX512F__)
#define SPN_VBYTES 64
#else
#define SPN_VBYTES 32
#endif
#endif
#ifndef SPN_CB
#define SPN_CB 8  // at most this many channels per register block
#endif

namespace {

// One vector of SPN_VBYTES (GCC/Clang vector extensions: one AVX-512 or AVX2 register, 2x NEON...), or one scalar
// for rows narrower than a vector.
template <typename T>
struct Wide {
    typedef T V __attribute__((vector_size(SPN_VBYTES)));
    static constexpr long lanes = SPN_VBYTES / sizeof(T);
};
template <typename T>
struct Narrow {
    using V = T;
    static constexpr long lanes = 1;
};

template <class V, class T>
inline V ld(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
}
template <class V, class T>
inline void st(T* p, V v) {
    std::memcpy(p, &v, sizeof(V));
}

// st without the read for ownership: a non-temporal store where p is aligned to a whole 64- or 32-byte
// vector (x86), else st. For the k*k-1 weight-gradient maps written once and not read soon (37.7 MB at
// [4, 48, 192, 256], more than the L3): the CSPN 7x7 backward 10.1-10.2 -> 8.7-9.1 ms, two runs alternating
// in one process on the 2-core EPYC VM. Callers issue fence_streams() before others read what they stored.
template <class V, class T>
inline void st_stream(T* p, V v) {
    [[maybe_unused]] const auto at = reinterpret_cast<std::uintptr_t>(p);
#if defined(__AVX512F__)
    if constexpr (sizeof(V) == 64) {
        if ((at & 63) == 0) {
            if constexpr (sizeof(T) == 4)
                _mm512_stream_ps(reinterpret_cast<float*>(p), reinterpret_cast<__m512>(v));
            else
                _mm512_stream_pd(reinterpret_cast<double*>(p), reinterpret_cast<__m512d>(v));
            return;
        }
    }
#endif
#if defined(__AVX__)
    if constexpr (sizeof(V) == 32) {
        if ((at & 31) == 0) {
            if constexpr (sizeof(T) == 4)
                _mm256_stream_ps(reinterpret_cast<float*>(p), reinterpret_cast<__m256>(v));
            else
                _mm256_stream_pd(reinterpret_cast<double*>(p), reinterpret_cast<__m256d>(v));
            return;
        }
    }
#endif
    st(p, v);
}

// Orders this thread's non-temporal stores before whatever follows (x86 sfence).
inline void fence_streams() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_sfence();
#endif
}

// Whether an output of this many bytes, written once, goes out with non-temporal stores: from 32 MB on
// it is too large to wait in the L3 for its reader (backward_rows' weight gradients, the weights' own
// nodes). [4, 48, 192, 256] float32, alone on preallocated buffers, 2-core EPYC VM: the normalisation
// 3.3-3.6 -> 2.7-2.8 ms, its backward 3.6-3.8 -> 2.7-2.9 ms; T=6 CSPN 7x7 propagate forward+backward
// 85.3 -> 81.5 ms. Smaller outputs (3x3: 6.3 MB) keep plain stores and stay in the L3 for the
// propagation that reads them next.
inline bool streams(long bytes) { return bytes >= (32L << 20); }

// st_stream where stream is set and one vector fills a 64-byte line, else st. Its callers (the forward's
// output; the CSPN weight gradients' dot_stencil, which now writes to a scratch block) interleave rows store
// by store: a block's channels, a window's weight maps. A 32-byte non-temporal store leaves its line half
// written in a write-combining buffer until the other half comes, and with more rows in flight than the core
// has such buffers the lines go out in partial writes. Every non-temporal -> only whole lines, [4, 11, 192,
// 256], 32-byte vectors, one step on preallocated buffers, the two builds alternating in one process, 2-core
// Zen 3 VM, two runs: forward CSPN 3x3 / 7x7, DySPN 7x7 4.13 / 9.37 / 9.20 -> 1.64 / 6.29 / 7.54 ms and 3.44
// / 7.88 / 8.47 -> 1.70 / 6.48 / 7.40 ms; backward 4.63 / 17.13 / 11.61 -> 3.32 / 10.56 / 11.59 ms and 4.76 /
// 17.25 / 11.91 -> 3.28 / 11.11 / 12.17 ms; at [8, 21, 256, 256] forward 17.9 / 48.3 / 61.1 -> 10.4 / 45.8 /
// 58.4 ms, backward 21.6 / 76.0 / 56.1 -> 18.3 / 65.0 / 56.4 ms. The loops that write one row vector after
// vector (grad_h, grad_h0, DySPN's weight gradient) fill each line with two stores in a row and keep
// st_stream: plain stores there made the backward 5-16 % slower (3.29 / 10.82 / 11.79 -> 3.92 / 11.35 / 13.24
// ms).
template <class V, class T>
inline void put(T* p, V v, bool stream) {
    if (stream && sizeof(V) >= 64)
        st_stream(p, v);
    else
        st(p, v);
}

// sign(v) per lane (0 at 0 and NaN, as torch.sign): vector comparisons give -1 for true, so (v < 0) - (v > 0).
template <class V>
inline V sign_of(V v) {
    const V zero{};
    return __builtin_convertvector(v < zero, V) - __builtin_convertvector(v > zero, V);
}

// f(t) for chunk starts covering [0, L) (L >= lanes): lanes apart, the last moved back to end at L.
// Overlapping chunks recompute the same values (every chunk stores, none accumulates into memory).
template <long lanes, class F>
inline void for_chunks(long L, F f) {
    for (long t0 = 0; t0 < L; t0 += lanes) f(t0 + lanes <= L ? t0 : L - lanes);
}

struct Offsets {
    int K = 0, r = 0;
    std::vector<int> dy, dx, ring;
    explicit Offsets(int k) : r(k / 2) {
        for (int a = -r; a <= r; ++a)
            for (int b = -r; b <= r; ++b)
                if (a != 0 || b != 0) {
                    dy.push_back(a);
                    dx.push_back(b);
                    ring.push_back(std::max(a < 0 ? -a : a, b < 0 ? -b : b) - 1);
                    ++K;
                }
    }
};

inline long clampl(long v, long lo, long hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Asks for the W elements at p (one image row) to be brought into the caches, one request per 64-byte line.
// The kernels read some 30-80 rows of different tensors per output row (each channel of h, h0 and g, each
// neighbour weight), more streams than the hardware prefetcher follows, so each row asks for the rows the
// next one will read first from memory.
template <typename T>
inline void prefetch_row(const T* p, long W) {
    const auto first = reinterpret_cast<std::uintptr_t>(p) & ~std::uintptr_t(63);
    const auto end = reinterpret_cast<std::uintptr_t>(p + W);
    for (auto at = first; at < end; at += 64) __builtin_prefetch(reinterpret_cast<const void*>(at), 0, 2);
}

// The rows the next output row reads first from memory, asked for in one of two ways. A burst (prefetch_row
// of each row as it is added) suits a step whose data sits in the caches. Spread: the rows are noted, and
// the current row's chunks ask for their lines as they go (chunk), so the requests trickle out over the row's
// compute instead of queueing up at its start: for a step whose data comes from memory. The kernels spread
// where a step moves more than half the last-level cache (cache_bytes / 2). Burst (cache_bytes 1 TB) ->
// that rule, 2-core EPYC VM (32 MB L3, 2 threads), one process, interleaved; CSPN 3x3 / 7x7, DySPN 7x7:
// - [4, 11, 192, 256]: forward 1.02 / 3.95 / 4.27 -> 1.00 / 3.55 / 3.82 ms; one step forward+backward
//   13.57 -> 11.82 ms (CSPN 7x7), 14.15 -> 13.18 ms (DySPN 7x7); T=6 propagate forward+backward
//   25.3 / 74.1 / 94.8 -> 24.4 / 66.5 / 88.5 ms.
// - [8, 21, 256, 256]: forward 7.75 / 22.1 / 24.9 -> 7.25 / 18.9 / 22.0 ms; T=6 117.8 / 358.7 / 403.9 ->
//   110.9 / 315.7 / 374.6 ms.
// - one batch item (the forward bursts, its backward spreads): T=6 5.4 / 17.6 / 22.2 -> 5.3 / 16.6 / 20.7 ms.
// Spreading every step instead gave the same within noise, except at one item in the L3, where a spread
// forward was 4-11 % slower.
class RowPrefetch {
   public:
    explicit RowPrefetch(bool spread) : spread_(spread) {}
    void clear() { n_ = 0; }
    // Row p of W elements: noted (spread; a burst for rows past kMax) or asked for now (burst).
    template <typename T>
    void add(const T* p, long W) {
        if (spread_ && n_ < kMax) {
            rows_[n_++] = reinterpret_cast<const char*>(p);
            __builtin_prefetch(p, 0, 2);  // its first line: chunk() asks for the line each chunk ends in
        } else {
            prefetch_row(p, W);
        }
    }
    // For the row loop's chunk at t (of a row of L elements, lanes per chunk): the line that its 64 bytes
    // from t end in, of every noted row. With the first line from add(), that covers each row's lines
    // whether or not the row starts on a line (reading past a row's end is harmless: a prefetch never
    // faults). Asked at every chunk that starts a 64-byte stretch and at the last (the overlapping one):
    // once per line, not per element where a chunk is one element (rows narrower than a vector).
    template <typename T>
    void chunk(long t, long lanes, long L) const {
        const long offset = t * long(sizeof(T));
        if (offset % 64 != 0 && t + lanes < L) return;
        for (int q = 0; q < n_; ++q) __builtin_prefetch(rows_[q] + offset + 63, 0, 2);
    }

   private:
    static constexpr int kMax = 256;
    bool spread_;
    int n_ = 0;
    const char* rows_[kMax];
};

// Bytes one forward step reads and writes at the least (h, h0 where the anchor weight is given, the output,
// the weight maps): with cache_bytes the kernels' choice of RowPrefetch. The backward counts twice this (the
// gradients written back are about as large as what the forward reads).
inline long step_bytes(long B, long C, long HW, int K, long R, bool rs, bool sw, bool aw, long elem) {
    return elem * B * HW * (C * (aw ? 3 : 2) + K + (rs ? R : 0) + (sw ? 1 : 0) + (aw ? 1 : 0));
}

// Whether a step that moves this many bytes prefetches spread (RowPrefetch): more than half the last-level
// cache of cache_bytes, what one item-major group of fused_propagation may take; a smaller one in bursts.
//
// Such a step also writes its outputs with non-temporal stores (st_stream; the forward's
// output, the backward's grad_h, grad_h0 and weight gradients where they overwrite; with vectors of less
// than a line the forward's output and CSPN's weight gradients are not, put says why): their lines would leave
// the cache before a reader came, and a plain store first reads each line it writes. Plain -> non-temporal,
// [4, 11, 192, 256] (every step spreads), one step on preallocated buffers, the two builds alternating in
// one process, 2-core EPYC VM, two runs: forward CSPN 3x3 / 7x7, DySPN 7x7 0.930 / 3.373 / 3.503 -> 0.827 /
// 3.182 / 3.371 ms and 1.147 / 3.534 / 3.898 -> 1.066 / 3.297 / 3.665 ms; backward 2.644 / 6.131 / 8.322
// -> 2.146 / 5.745 / 7.546 ms and 3.144 / 6.442 / 9.017 -> 2.571 / 5.903 / 7.963 ms. Steps that fit the
// cache (item-major groups of fused_propagation) keep plain stores: their outputs are read next, from L3.
inline bool spreads(long bytes, long cache_bytes) { return bytes > cache_bytes / 2; }

// A zeroed buffer of n elements that starts on a vector boundary.
template <typename T>
class AlignedBuffer {
   public:
    explicit AlignedBuffer(long n) : store_(n + SPN_VBYTES / sizeof(T), T(0)) {
        const auto a = reinterpret_cast<std::uintptr_t>(store_.data()), m = std::uintptr_t(SPN_VBYTES);
        data_ = reinterpret_cast<T*>((a + m - 1) / m * m);
    }
    T* data() { return data_; }

   private:
    std::vector<T> store_;
    T* data_;
};

// Padded copies of the rows v in [y - r, y + r] of one [B, C, H, W] tensor, all channels, in 2r+1
// slots (slot = v mod (2r+1)); a row is copied when first asked for. Replicate mode: row clamp(v),
// columns padded with the border value (rows outside the image are allowed). Zero mode: columns
// padded with zeros (rows must be inside the image).
template <typename T>
class RowRing {
   public:
    // Every padded row starts on a vector boundary and has a vector of spare room past its end (zeros),
    // so aligned vector pairs can be read over the whole padded row (stencil_block).
    // ahead > 0: a row's copy asks for the channel rows `ahead` after the one it copies (prefetch_row).
    RowRing(const T* data, long C, long H, long W, int r, long pad, bool replicate, long ahead = 0)
        : data_(data), C_(C), H_(H), W_(W), n_(2 * r + 1), pad_(pad), len_(padded_length(W + 2 * pad)),
          ahead_(ahead), replicate_(replicate), store_(C * (2 * r + 1) * len_), buf_(store_.data()),
          tag_b_(2 * r + 1, -1), tag_v_(2 * r + 1, LONG_MIN) {}

    // The slot holding row v of batch b, copied there first if needed. Call once per row and output row:
    // the modulo is not free.
    long slot(long b, long v) {
        const long s = ((v % n_) + n_) % n_;
        if (tag_b_[s] != b || tag_v_[s] != v) fill(b, v, s);
        return s;
    }

    // Channel c of a slot's padded row: element x of the row is at [pad + x].
    const T* at(long s, long c) const { return buf_ + (c * n_ + s) * len_; }

    // Distance between channel c and c + 1 of one slot.
    long channel_stride() const { return n_ * len_; }

   private:
    void fill(long b, long v, long s) {
        const long src_row = replicate_ ? clampl(v, 0, H_ - 1) : v;
        const auto row = [&](long c) { return data_ + ((b * C_ + c) * H_ + src_row) * W_; };
        for (long c = 0; c < std::min(ahead_, C_); ++c) prefetch_row(row(c), W_);
        for (long c = 0; c < C_; ++c) {
            if (ahead_ && c + ahead_ < C_) prefetch_row(row(c + ahead_), W_);
            const T* src = row(c);
            T* dst = buf_ + (c * n_ + s) * len_;
            const T left = replicate_ ? src[0] : T(0), right = replicate_ ? src[W_ - 1] : T(0);
            std::fill(dst, dst + pad_, left);
            std::memcpy(dst + pad_, src, sizeof(T) * W_);
            std::fill(dst + pad_ + W_, dst + W_ + 2 * pad_, right);
        }
        tag_b_[s] = b;
        tag_v_[s] = v;
    }

    static constexpr long kAlign = SPN_VBYTES / sizeof(T);  // elements per vector
    static long padded_length(long n) { return (n + 2 * kAlign - 1) / kAlign * kAlign; }  // + spare vector

    const T* data_;
    long C_, H_, W_, n_, pad_, len_, ahead_;
    bool replicate_;
    AlignedBuffer<T> store_;
    T* buf_;
    std::vector<long> tag_b_, tag_v_;
};

// For one vector chunk at t and channels [c0, c0 + CB), with channel c of neighbour j's source row at
// src[j] + c * cs:   acc_i = init(c0 + i, t) + sum_{j < K} w[j][t] * (src[j] + (c0 + i) * cs)[t];
//                    store(c0 + i, t, acc_i)
// (w[j][t] * sc[j][t] for the weight where SCALED). The CB accumulators live in registers; each weight
// vector is loaded once for the block.
template <class P, int CB, bool SCALED, typename T, class Init, class Store>
inline void window_block(long t, int c0, int K, long cs, const T* const* w, const T* const* sc, const T* const* src,
                         Init& init, Store& store) {
    using V = typename P::V;
    V acc[CB];
#pragma GCC unroll 8
    for (int i = 0; i < CB; ++i) acc[i] = init(c0 + i, t);
    for (int j = 0; j < K; ++j) {
        V wv = ld<V>(w[j] + t);
        if constexpr (SCALED) wv *= ld<V>(sc[j] + t);
        const T* sj = src[j] + c0 * cs + t;
#pragma GCC unroll 8
        for (int i = 0; i < CB; ++i) acc[i] += wv * ld<V>(sj + i * cs);
    }
#pragma GCC unroll 8
    for (int i = 0; i < CB; ++i) store(c0 + i, t, acc[i]);
}

// window_block for a block of `size` channels (1 .. SPN_CB), dispatched to its compile-time size.
template <class P, int CB, bool SCALED, typename T, class Init, class Store>
inline void window_sized(int size, long t, int c0, int K, long cs, const T* const* w, const T* const* sc,
                         const T* const* src, Init& init, Store& store) {
    if constexpr (CB > 0) {
        if (size == CB) return window_block<P, CB, SCALED>(t, c0, K, cs, w, sc, src, init, store);
        window_sized<P, CB - 1, SCALED>(size, t, c0, K, cs, w, sc, src, init, store);
    }
}

// f(c0, size, first) for the fewest blocks of at most SPN_CB of C channels, balanced: each takes the remaining
// channels spread evenly over the remaining blocks. first: the first block.
template <class F>
inline void for_channel_blocks(long C, F f) {
    const int blocks = int((C + SPN_CB - 1) / SPN_CB);
    for (int i = 0, c0 = 0; i < blocks; ++i) {
        const int size = int((C - c0) / (blocks - i));
        f(c0, size, i == 0);
        c0 += size;
    }
}

// window_block over a whole row of length L and all C channels, in the fewest channel blocks of at
// most SPN_CB, balanced (11 channels: 6 + 5; 21: 7 + 7 + 7). Channel blocks outermost: each block
// sweeps the whole row, so a weight line serves one block and streams through L1. Chunks outermost
// (every block per chunk) needs a chunk's k*k-1 weight lines to stay in L1 from one block to the
// next, but those lines lie one [H, W] map apart, a multiple of 4 KB at most sizes, so they fall in
// one L1 set and evict each other; the speed then hung on where the allocator put the tensors (7x7
// forward on [4, 11, 192, 256]: 2.7-3.6 ms by base address, against 2.4-2.5 ms this way).
template <class P, bool SCALED, typename T, class Init, class Store>
inline void window_row(long L, long C, int K, long cs, const T* const* w, const T* const* sc, const T* const* src,
                       Init init, Store store, const RowPrefetch& pf) {
    for_channel_blocks(C, [&](int c0, int size, bool first) {
        for_chunks<P::lanes>(L, [&](long t) {
            if (first) pf.chunk<T>(t, P::lanes, L);
            window_sized<P, SPN_CB, SCALED>(size, t, c0, K, cs, w, sc, src, init, store);
        });
    });
}

// The vector of lanes [S, S + lanes) of the pair (a, b) (a's lanes S.., then b's): one two-source
// shuffle. On AVX-512 it is valignd / valignq, which takes neither an index vector nor a destination it
// overwrites: GCC 12 turned the generic shuffle into vpermt2ps for some of the kernels, each needing an
// index register, a copy and (for register pressure) reloads of the row. Generic shuffle -> valign, both
// builds alternating in one process on the 2-core EPYC VM, [4, 11, 192, 256], the backward alone (dot_stencil
// shifts h for every channel), CSPN 3x3 / 7x7, DySPN 7x7, two runs (each build first once): 2.253 / 5.733 /
// 7.233 -> 2.143 / 5.535 / 6.732 ms and 2.388 / 6.339 / 7.240 -> 2.354 / 6.116 / 6.840 ms; the forwards the
// same within noise (0.812 / 3.100 / 3.347 -> 0.817 / 3.099 / 3.276 ms).
template <int S, class V, int... I>
inline V lane_shift(V a, V b, std::integer_sequence<int, I...>) {
    if constexpr (S == 0) {
        return a;
    }
#if defined(__AVX512F__)
    else if constexpr (sizeof(V) == 64) {
        const auto lo = reinterpret_cast<__m512i>(a), hi = reinterpret_cast<__m512i>(b);
        if constexpr (sizeof(a[0]) == 4)
            return reinterpret_cast<V>(_mm512_alignr_epi32(hi, lo, S));
        else
            return reinterpret_cast<V>(_mm512_alignr_epi64(hi, lo, S));
    }
#endif
    else {
#if defined(__clang__)
        return __builtin_shufflevector(a, b, (S + I)...);
#else
        using E = std::conditional_t<sizeof(a[0]) == 4, int, long long>;
        typedef E M __attribute__((vector_size(sizeof(V))));
        return __builtin_shuffle(a, b, M{(S + I)...});
#endif
    }
}

// acc += sum_s w[s] * (lanes [s, s + lanes) of (a, b)).
template <class V, int... I, int... S>
inline void shifted_fmas(V& acc, const V* w, V a, V b, std::integer_sequence<int, I...> lanes,
                         std::integer_sequence<int, S...>) {
    ((acc += w[S] * lane_shift<S>(a, b, lanes)), ...);
}

// window_block for a dense (2R+1)^2 window of row shifts, at a chunk t that is a multiple of the vector:
// window position (dy, s) adds w[dy*D + s][x] * rows[dy][c * cs + x + s] to output x of channel c (the
// forward: rows[dy] is ring row y + dy - R with image column x at [R + x], so s = dx + R). The 2R+1
// shifts of one row come from two aligned loads and lane shifts instead of 2R+1 unaligned loads, all but
// one of which cross a cache line (rows must start vector-aligned: RowRing's do). Positions without a
// neighbour (the centre) point at a row of zeros: 1 / (2R+1)^2 of the FMAs are spent on them.
// [4, 11, 192, 256] 7x7 forward on a 2-core Xeon VM: 2.7-2.8 ms through window_row, 2.2-2.3 ms here. On the
// 2-core Zen 3 VM (AVX2: no one-instruction shift across a pair of 32-byte vectors, as valignd is), packed
// weights with 2R+1 unaligned loads per row instead of the shifts (centre skipped), one step's forward on
// preallocated buffers, both builds alternating 15 rounds in one process, best of each, results identical:
// CSPN 3x3 / 5x5 / 7x7, DySPN 7x7 1.489 / 2.774 / 4.694 / 5.386 -> 1.424 / 3.076 / 5.433 / 6.573 ms. The
// shifts stay.
template <class P, int CB, int R, bool SCALED, typename T, class Init, class Store>
inline void stencil_block(long t, long wt, int c0, long cs, const T* const* w, const T* const* sc,
                          const T* const* rows, Init& init, Store& store) {
    using V = typename P::V;
    constexpr int D = 2 * R + 1;
    static_assert(2 * R < P::lanes, "a shift must stay inside the pair of vectors");
    using Lanes = std::make_integer_sequence<int, int(P::lanes)>;
    V acc[CB];
#pragma GCC unroll 8
    for (int i = 0; i < CB; ++i) acc[i] = init(c0 + i, t);
    for (int dy = 0; dy < D; ++dy) {
        V wv[D];
#pragma GCC unroll 8
        for (int s = 0; s < D; ++s) {
            wv[s] = ld<V>(w[dy * D + s] + wt);
            if constexpr (SCALED) wv[s] *= ld<V>(sc[dy * D + s] + wt);
        }
        const T* row = rows[dy] + c0 * cs + t;
#pragma GCC unroll 8
        for (int i = 0; i < CB; ++i)
            shifted_fmas(acc[i], wv, ld<V>(row + i * cs), ld<V>(row + i * cs + P::lanes), Lanes{},
                         std::make_integer_sequence<int, D>{});
    }
#pragma GCC unroll 8
    for (int i = 0; i < CB; ++i) store(c0 + i, t, acc[i]);
}

template <class P, int CB, int R, bool SCALED, typename T, class Init, class Store>
inline void stencil_sized(int size, long t, long wt, int c0, long cs, const T* const* w, const T* const* sc,
                          const T* const* rows, Init& init, Store& store) {
    if constexpr (CB > 0) {
        if (size == CB) return stencil_block<P, CB, R, SCALED>(t, wt, c0, cs, w, sc, rows, init, store);
        stencil_sized<P, CB - 1, R, SCALED>(size, t, wt, c0, cs, w, sc, rows, init, store);
    }
}

// window_row for the forward's window of radius R: aligned chunks through stencil_block, the last chunk
// of a row whose length is no multiple of the vector (it overlaps the one before) through window_block.
template <class P, int R, bool SCALED, typename T, class Init, class Store>
inline void stencil_row(long L, long C, int K, long cs, const T* const* w, const T* const* sc, const T* const* src,
                        const T* const* ws, const T* const* scs, const T* const* rows, Init init, Store store,
                        const RowPrefetch& pf) {
    for_channel_blocks(C, [&](int c0, int size, bool first) {
        for_chunks<P::lanes>(L, [&](long t) {
            if (first) pf.chunk<T>(t, P::lanes, L);
            if (t % P::lanes == 0)
                stencil_sized<P, SPN_CB, R, SCALED>(size, t, t, c0, cs, ws, scs, rows, init, store);
            else
                window_sized<P, SPN_CB, SCALED>(size, t, c0, K, cs, w, sc, src, init, store);
        });
    });
}

// Whether stencil_block serves radius r with vectors P: r = 1..3, and a shift of up to 2r lanes stays
// inside the pair of vectors (SPN_VBYTES below 64 can leave too few lanes).
template <class P>
constexpr bool stencil_fits(int r) {
    return r >= 1 && r <= 3 && 2 * r < P::lanes;
}

// One forward row: stencil_row for a radius that stencil_fits (0: not wanted), else window_row.
template <class P, bool SCALED, typename T, class Init, class Store>
inline void forward_row(int radius, long L, long C, int K, long cs, const T* const* w, const T* const* sc,
                        const T* const* src, const T* const* ws, const T* const* scs, const T* const* rows, Init init,
                        Store store, const RowPrefetch& pf) {
    if constexpr (stencil_fits<P>(1)) {
        if (radius == 1) return stencil_row<P, 1, SCALED>(L, C, K, cs, w, sc, src, ws, scs, rows, init, store, pf);
    }
    if constexpr (stencil_fits<P>(2)) {
        if (radius == 2) return stencil_row<P, 2, SCALED>(L, C, K, cs, w, sc, src, ws, scs, rows, init, store, pf);
    }
    if constexpr (stencil_fits<P>(3)) {
        if (radius == 3) return stencil_row<P, 3, SCALED>(L, C, K, cs, w, sc, src, ws, scs, rows, init, store, pf);
    }
    window_row<P, SCALED>(L, C, K, cs, w, sc, src, init, store, pf);
}

// The forward packs its weights (packed_row) from this radius on, SPN_SEG chunks at a time. One step's forward
// on preallocated buffers, unpacked -> packed, the two builds alternating in one process, 2-core Zen 3 VM:
// - [4, 11, 192, 256]: CSPN 3x3 / 7x7, DySPN 7x7 1.78 / 7.10 / 7.67 -> 1.61 / 5.74 / 6.20 ms; CSPN / DySPN
//   5x5 3.02 / 3.54 -> 2.88 / 3.44 ms;
// - [8, 21, 256, 256]: 9.17 / 39.99 / 49.16 -> 8.77 / 27.66 / 32.61 ms;
// - [1, 11, 192, 256] (in the L3): 1.20 / 1.40 -> 1.02 / 1.14 ms at 7x7, 0.65 / 0.75 -> 0.54 / 0.64 ms at
//   5x5, but CSPN 3x3 slower then, 0.29-0.30 -> 0.35-0.45 ms in four runs.
// Two chunks at a time instead of the whole row: the same at [4, 11, 192, 256], 7x7 at [8, 21, 256, 256]
// 26.0 / 35.3 -> 40.0 / 44.1 ms (the rows read a line at a time each instead of start to end).
//
// pack_weights asks for the weight rows SPN_AHEAD ahead of the one it copies; before, the row loop asked
// for all k*k-1 rows of the next output row at once (RowPrefetch). Those rows lie one [H, W] map apart,
// 192 KB at 192x256, a multiple of the L2's 64 KB way: a column's k*k-1 lines fall in one 8-way L2 set, so
// most of them were likely evicted again before the copy came to them. With the rows asked for a few at a
// time, 3x3 is packed as well. Both changes (radius 2 -> 1 and the prefetch), both builds alternating in one
// process, 2-core Zen 3 VM, CSPN 3x3 / 7x7, DySPN 7x7, CSPN / DySPN 5x5, DySPN 3x3, ms:
// - [4, 11, 192, 256]: 1.86 / 5.11 / 5.61 / 2.91 / 3.37 / 1.89 -> 1.48 / 4.41 / 4.79 / 2.56 / 2.86 / 1.72;
// - [8, 21, 256, 256]: 10.87 / 27.31 / 29.29 / 14.72 / 14.95 / 10.46 -> 9.25 / 21.92 / 23.57 / 13.70 / 14.71
//   / 10.50;
// - [1, 11, 192, 256]: 0.343 / 0.953 / 1.017 / 0.518 / 0.579 / 0.369 -> 0.311 / 0.899 / 0.988 / 0.480 / 0.536
//   / 0.333.
// 2, 4 or 8 rows ahead: the same within noise (7x7, [4, 11, 192, 256]); 1 row ahead less of a gain.
#ifndef SPN_PACK_RADIUS
#define SPN_PACK_RADIUS 1
#endif
#ifndef SPN_AHEAD
#define SPN_AHEAD 4  // rows asked for ahead of the one copied (pack_weights, backward_rows)
#endif
#ifndef SPN_SEG
#define SPN_SEG 128  // chunks: 1024 columns of float32 with 32-byte vectors, 200 KB of packed 7x7 weights
#endif

// The neighbour weights of chunks [m0, m1) of a row (chunk m: columns [m * lanes, (m + 1) * lanes)),
// chunk-major: window position p of chunk m at pack[((m - m0) * DD + p) * lanes], times the ring scale where
// SCALED. Positions without a neighbour (the centre) are left as they are (zeros).
template <class P, bool SCALED, typename T>
inline void pack_weights(long m0, long m1, int K, int DD, const int* window, const T* const* w, const T* const* sc,
                         T* pack) {
    using V = typename P::V;
    constexpr long lanes = P::lanes;
    const long n = (m1 - m0) * lanes;
    for (int j = 0; j < std::min(K, SPN_AHEAD); ++j) prefetch_row(w[j] + m0 * lanes, n);
    for (int j = 0; j < K; ++j) {
        if (j + SPN_AHEAD < K) prefetch_row(w[j + SPN_AHEAD] + m0 * lanes, n);
        T* __restrict__ dst = pack + window[j] * lanes;
        for (long m = m0; m < m1; ++m) {
            V v = ld<V>(w[j] + m * lanes);
            if constexpr (SCALED) v *= ld<V>(sc[j] + m * lanes);
            st(dst + (m - m0) * DD * lanes, v);
        }
    }
}

// stencil_row for the forward, its weights packed (pack_weights) SPN_SEG chunks at a time into pack (the
// chunks' weights for every window position, ws[p] = pack + p * lanes), each segment's chunks then swept
// by every channel block. The weights of one window position lie one [H, W] map from the next, a multiple of
// 4 KB apart at most sizes, so a chunk's k*k-1 weight vectors fall in one L1 set; read in place, each line
// was evicted before the chunk after it read its second half.
template <class P, int R, bool SCALED, typename T, class Init, class Store>
inline void packed_row(long L, long C, int K, long cs, const T* const* w, const T* const* sc, const T* const* src,
                       const int* window, T* pack, const T* const* ws, const T* const* rows, Init init, Store store,
                       const RowPrefetch& pf) {
    constexpr long lanes = P::lanes;
    constexpr int DD = (2 * R + 1) * (2 * R + 1);
    const long full = L / lanes;
    for (long m0 = 0; m0 < full; m0 += SPN_SEG) {
        const long m1 = std::min(full, m0 + long(SPN_SEG));
        pack_weights<P, SCALED>(m0, m1, K, DD, window, w, sc, pack);
        for_channel_blocks(C, [&](int c0, int size, bool first) {
            for (long m = m0; m < m1; ++m) {
                if (first) pf.chunk<T>(m * lanes, lanes, L);
                stencil_sized<P, SPN_CB, R, false>(size, m * lanes, (m - m0) * DD * lanes, c0, cs, ws, ws, rows,
                                                   init, store);
            }
        });
    }
    if (L % lanes != 0) {  // the last chunk, overlapping the one before
        const long t = L - lanes;
        pf.chunk<T>(t, lanes, L);
        for_channel_blocks(C, [&](int c0, int size, bool) {
            window_sized<P, SPN_CB, SCALED>(size, t, c0, K, cs, w, sc, src, init, store);
        });
    }
}

// packed_row for radius SPN_PACK_RADIUS to 3 where stencil_fits (the caller checked).
template <class P, bool SCALED, typename T, class Init, class Store>
inline void packed_forward_row(int radius, long L, long C, int K, long cs, const T* const* w, const T* const* sc,
                               const T* const* src, const int* window, T* pack, const T* const* ws,
                               const T* const* rows, Init init, Store store, const RowPrefetch& pf) {
    if constexpr (stencil_fits<P>(1) && SPN_PACK_RADIUS <= 1) {
        if (radius == 1)
            return packed_row<P, 1, SCALED>(L, C, K, cs, w, sc, src, window, pack, ws, rows, init, store, pf);
    }
    if constexpr (stencil_fits<P>(2)) {
        if (radius == 2)
            return packed_row<P, 2, SCALED>(L, C, K, cs, w, sc, src, window, pack, ws, rows, init, store, pf);
    }
    if constexpr (stencil_fits<P>(3)) {
        if (radius == 3)
            return packed_row<P, 3, SCALED>(L, C, K, cs, w, sc, src, window, pack, ws, rows, init, store, pf);
    }
}

// The self and anchor weights' gradients of a backward row, gsw = sum_c g[c] * h[c] (the window's centre)
// and gaw = sum_c g[c] * h0[c], at column 0 of their rows; h0's channels lie hs apart. Null: not wanted.
// Computed in the weight gradients' pass over the channels (dot_row) instead of passes of their own; where
// no weight gradient is wanted, by extras_chunk over the row.
template <typename T>
struct Extras {
    T* gsw = nullptr;
    T* gaw = nullptr;
    const T* h0 = nullptr;
    long hs = 0;
    // Factored weights written straight from dot_stencil_rows (by window position): the output is the
    // gradient times scale[p], and gring[p] (the ring scale's gradient row) gets the gradient times aff[p].
    const T* const* scale = nullptr;
    const T* const* aff = nullptr;
    T* const* gring = nullptr;
};

// Extras for the chunk at t (any offset), h[c] read from hc + c * cs.
template <class P, typename T>
inline void extras_chunk(long t, long C, const T* const* g, const T* hc, long cs, const Extras<T>& e) {
    using V = typename P::V;
    V ssw = V{} + T(0), saw = V{} + T(0);
    for (long c = 0; c < C; ++c) {
        const V gv = ld<V>(g[c] + t);
        if (e.gsw) ssw += gv * ld<V>(hc + c * cs + t);
        if (e.gaw) saw += gv * ld<V>(e.h0 + c * e.hs + t);
    }
    if (e.gsw) st(e.gsw + t, ssw);
    if (e.gaw) st(e.gaw + t, saw);
}

// For one vector chunk at t and neighbours [j0, j0 + JB):  out[j][t] = sum_c g[c][t] * (src[j] + c * cs)[t].
template <class P, int JB, typename T>
inline void dot_block(long t, int j0, long C, long cs, const T* const* g, const T* const* src, T* const* out) {
    using V = typename P::V;
    V acc[JB];
#pragma GCC unroll 8
    for (int i = 0; i < JB; ++i) acc[i] = V{} + T(0);
    const T* sj[JB];
#pragma GCC unroll 8
    for (int i = 0; i < JB; ++i) sj[i] = src[j0 + i] + t;
    for (long c = 0; c < C; ++c) {
        const V gv = ld<V>(g[c] + t);
#pragma GCC unroll 8
        for (int i = 0; i < JB; ++i) acc[i] += gv * ld<V>(sj[i] + c * cs);
    }
#pragma GCC unroll 8
    for (int i = 0; i < JB; ++i) st(out[j0 + i] + t, acc[i]);
}

// acc[s] += g * (lanes [s, s + lanes) of (a, b)) for every s.
template <class V, int... I, int... S>
inline void shifted_products(V* acc, V g, V a, V b, std::integer_sequence<int, I...> lanes,
                             std::integer_sequence<int, S...>) {
    ((acc[S] += g * lane_shift<S>(a, b, lanes)), ...);
}

// dot_block for the window rows [dy0, dy0 + NY) of radius R at a chunk t that is a multiple of the
// vector: out[dy*D + s][t] = sum_c g[c][t] * (lanes [s, s + lanes) of rows[dy] + c * cs + t and the vector
// after it), rows[dy] the replicate-padded ring row y + dy - R (image column x at [R + x]). A channel costs
// one load of g, two aligned loads, 2R lane shifts and 2R+1 FMAs per window row into NY * (2R+1)
// accumulators, where dot_block pays one unaligned load per FMA, most of them across a cache line.
// out[centre] is null (not stored); where the centre row is among them, its centre accumulator is e.gsw,
// and with AW the pass sums e.gaw too.
template <class P, int R, int NY, bool AW, typename T>
inline void dot_stencil_rows(long t, int dy0, long C, long cs, const T* const* g, const T* const* rows,
                             T* const* out, const Extras<T>& e, bool stream) {
    using V = typename P::V;
    constexpr int D = 2 * R + 1;
    static_assert(2 * R < P::lanes, "a shift must stay inside the pair of vectors");
    using Lanes = std::make_integer_sequence<int, int(P::lanes)>;
    V acc[NY][D];
#pragma GCC unroll 8
    for (int i = 0; i < NY; ++i)
#pragma GCC unroll 8
        for (int s = 0; s < D; ++s) acc[i][s] = V{} + T(0);
    const T* row[NY];
#pragma GCC unroll 8
    for (int i = 0; i < NY; ++i) row[i] = rows[dy0 + i] + t;
    V saw = V{} + T(0);
    if (e.scale)  // the affinity's lines two chunks on (backward_rows says why); the centre has none
        for (int i = 0; i < NY; ++i)
            for (int s = 0; s < D; ++s)
                if (out[(dy0 + i) * D + s]) __builtin_prefetch(e.aff[(dy0 + i) * D + s] + t + 2 * P::lanes, 0, 2);
    for (long c = 0; c < C; ++c) {
        const V gv = ld<V>(g[c] + t);
#pragma GCC unroll 8
        for (int i = 0; i < NY; ++i) {
            const V a = ld<V>(row[i] + c * cs), b = ld<V>(row[i] + c * cs + P::lanes);
            shifted_products(acc[i], gv, a, b, Lanes{}, std::make_integer_sequence<int, D>{});
        }
        if constexpr (AW) saw += gv * ld<V>(e.h0 + c * e.hs + t);
    }
#pragma GCC unroll 8
    for (int i = 0; i < NY; ++i)
#pragma GCC unroll 8
        for (int s = 0; s < D; ++s)
            if (T* o = out[(dy0 + i) * D + s]) {
                V v = acc[i][s];
                if (e.scale) {
                    const int p = (dy0 + i) * D + s;
                    T* gr = e.gring[p] + t;
                    st(gr, ld<V>(gr) + v * ld<V>(e.aff[p] + t));
                    v *= ld<V>(e.scale[p] + t);
                }
                put(o + t, v, stream);
            }
    if (e.gsw && dy0 <= R && R < dy0 + NY) st(e.gsw + t, acc[R - dy0][R]);
    if constexpr (AW) st(e.gaw + t, saw);
}

// One pass of dot_stencil_rows, summing e.gaw where it holds the centre row and gaw is wanted.
template <class P, int R, int NY, typename T>
inline void dot_stencil_pass(long t, int dy0, long C, long cs, const T* const* g, const T* const* rows,
                             T* const* out, const Extras<T>& e, bool stream) {
    if (e.gaw && dy0 <= R && R < dy0 + NY)
        dot_stencil_rows<P, R, NY, true>(t, dy0, C, cs, g, rows, out, e, stream);
    else
        dot_stencil_rows<P, R, NY, false>(t, dy0, C, cs, g, rows, out, e, stream);
}

// dot_stencil_rows over the whole window, NY window rows at a time: fewer rows per pass leave fewer
// accumulators, more rows load g fewer times. The extras go with the pass that holds the centre row (gsw
// is its centre accumulator).
template <class P, int R, int NY, typename T>
inline void dot_stencil(long t, long C, long cs, const T* const* g, const T* const* rows, T* const* out,
                        const Extras<T>& e, bool stream) {
    constexpr int D = 2 * R + 1;
    int dy0 = 0;
    for (; dy0 + NY <= D; dy0 += NY) dot_stencil_pass<P, R, NY>(t, dy0, C, cs, g, rows, out, e, stream);
    if constexpr (D % NY != 0) dot_stencil_pass<P, R, D % NY>(t, dy0, C, cs, g, rows, out, e, stream);
}

// The weight gradients of one row, out[j] = sum_c g[c] * shift_j(h[c]): chunks at multiples of the vector
// through dot_stencil where radius is 1 to 3 (rows and wout: the ring rows and the outputs by window
// position), the last, overlapping chunk and other radii through dot_block. [4, 11, 192, 256], the weight
// gradients alone, alternating in one process on the 2-core EPYC VM: 7x7 5.24 -> 4.37 ms (1.09 -> 0.74 ms
// at B = 1), a window row at a time. 3x3 one window row at a time was slower than dot_block (0.68 -> 0.81
// ms: three accumulators, each a chain of C dependent FMAs); all three rows at once, nine accumulators,
// 0.965 / 0.871 / 0.875 -> 0.836 / 0.748 / 0.713 ms in three runs (B = 1 the same within noise), the whole
// backward 2.720 / 2.348 -> 2.434 / 2.166 ms. 7x7 three rows at once was slower (2.970 / 2.354 -> 3.200 /
// 2.656 ms), 5x5 all five rows at once the same within noise.
// The extras (gsw, gaw) are summed in the same pass over the channels, gsw for free (the window's centre),
// instead of passes of their own over g, h and h0. The whole backward, both builds alternating, three runs:
// DySPN 7x7 (both extras) 7.742 / 7.931 / 7.594 -> 7.327 / 7.258 / 7.339 ms, CSPN 7x7 (gaw) 5.680 / 6.070 /
// 6.033 -> 5.533 / 5.779 / 6.157 ms, CSPN 3x3 2.193 / 2.430 / 2.166 -> 2.071 / 2.203 / 2.150 ms. grad_h0
// (aw * g) keeps a pass of its own: stored in the same pass, C rows a vector at a time each, the CSPN 3x3
// backward was 1-10 % slower.
template <class P, typename T>
inline void dot_row(int radius, long W, long C, int K, long cs, const T* const* g, const T* const* src,
                    T* const* out, const T* const* rows, T* const* wout, const T* hc,
                    const Extras<T>& e, bool stream = false) {
    const bool extras = e.gsw || e.gaw;
    for_chunks<P::lanes>(W, [&](long t) {
        if (radius > 0 && t % P::lanes == 0) {
            if constexpr (P::lanes > 2) {
                if (radius == 1) return dot_stencil<P, 1, 3>(t, C, cs, g, rows, wout, e, stream);
            }
            if constexpr (P::lanes > 4) {
                if (radius == 2) return dot_stencil<P, 2, 1>(t, C, cs, g, rows, wout, e, stream);
            }
            if constexpr (P::lanes > 6) {
                if (radius == 3) return dot_stencil<P, 3, 1>(t, C, cs, g, rows, wout, e, stream);
            }
        }
        int j0 = 0;
        for (; j0 + 4 <= K; j0 += 4) dot_block<P, 4>(t, j0, C, cs, g, src, out);
        for (; j0 < K; ++j0) dot_block<P, 1>(t, j0, C, cs, g, src, out);
        if (extras) extras_chunk<P>(t, C, g, hc, cs, e);
    });
}

// Rows [begin, end) of the B * H output rows for this thread.
inline void thread_rows(long rows, long& begin, long& end) {
#ifdef _OPENMP
    const long nt = omp_get_num_threads(), tid = omp_get_thread_num();
#else
    const long nt = 1, tid = 0;
#endif
    const long per = (rows + nt - 1) / nt;
    begin = std::min(rows, tid * per);
    end = std::min(rows, begin + per);
}

template <typename T, class P>
void forward_rows(const T* h, const T* h0, const T* nw, const T* rs, const T* sw, const T* aw, T* out, long B, long C,
                  long H, long W, const Offsets& off, bool spread) {
    using V = typename P::V;
    const long HW = H * W;
    const int K = off.K, r = off.r;
    long begin, end;
    thread_rows(B * H, begin, end);
    RowRing<T> ring(h, C, H, W, r, r, /*replicate=*/true);
    const long R = r;  // rings of the ring scale
    std::vector<const T*> w(K), sc(K), src(K);
    std::vector<long> slots(2 * r + 1);
    // The stencil path: weight rows by window position, the centre at zeros (packed: in pack, below).
    const bool stencil = stencil_fits<P>(r);
    const bool packed = stencil && r >= SPN_PACK_RADIUS;
    const int D = 2 * r + 1;
    std::vector<T> zeros(stencil && !packed ? W : 0, T(0));
    std::vector<const T*> ws(D * D, zeros.data()), scs(D * D, zeros.data()), rows(D);
    std::vector<int> window(K);
    for (int j = 0; j < K; ++j) window[j] = (off.dy[j] + r) * D + off.dx[j] + r;
    // The stencil's weights, packed (packed_row) a segment of at most SPN_SEG chunks at a time; the centre's
    // stay zero.
    AlignedBuffer<T> pack(packed ? std::min(W / P::lanes, long(SPN_SEG)) * D * D * P::lanes : 0);
    std::vector<const T*> wpack(D * D);
    for (int q = 0; packed && q < D * D; ++q) wpack[q] = pack.data() + q * P::lanes;
    RowPrefetch pf(spread);
    for (long row = begin; row < end; ++row) {
        const long b = row / H, y = row % H, at = y * W;
        for (int d = -r; d <= r; ++d) slots[d + r] = ring.slot(b, y + d);
        for (int j = 0; j < K; ++j) {
            w[j] = nw + (b * K + j) * HW + at;
            if (rs) sc[j] = rs + (b * R + off.ring[j]) * HW + at;
            src[j] = ring.at(slots[off.dy[j] + r], 0) + r + off.dx[j];
        }
        // The next row's weight rows, its h0 rows and the h rows its ring copies in. [4, 11, 192, 256], 2-core
        // EPYC VM, alternating in one process: prefetching h and h0 as well took the 3x3 forward from 0.93-1.08
        // to 0.78-0.93 ms (7x7: no change). Prefetching the output rows for writing made it slower; the ring
        // scale's, self and anchor weight rows too made no difference.
        pf.clear();
        if (row + 1 < end) {
            const long nb = (row + 1) / H, ny = (row + 1) % H, ahead = std::min(ny + r, H - 1);
            for (int j = 0; !packed && j < K; ++j) pf.add(nw + (nb * K + j) * HW + ny * W, W);
            for (long c = 0; c < C; ++c) {
                pf.add(h + ((nb * C + c) * H + ahead) * W, W);
                if (aw) pf.add(h0 + ((nb * C + c) * H + ny) * W, W);
            }
        }
        const T* swr = sw ? sw + b * HW + at : nullptr;
        const T* awr = aw ? aw + b * HW + at : nullptr;
        const T* h0b = h0 + b * C * HW + at;
        // h's row y for the self weight from the ring, not the tensor: there its C rows lie one [H, W] map
        // apart, in one L1 set with h0's (packed_row says more). One step's forward, the two builds
        // alternating in one process, 2-core Zen 3 VM, two runs each order: DySPN 7x7 [4, 11, 192, 256]
        // 6.89 / 6.15 -> 6.75 / 5.92 ms, [8, 21, 256, 256] 32.3 / 31.0 -> 30.0 / 27.9 ms; DySPN 3x3 2.28 /
        // 2.90 -> 2.12 / 2.73 ms and 12.5 / 11.7 -> 10.6 / 9.6 ms. h0's rows copied to a buffer first as well:
        // no clear change (CSPN 7x7 5-9 % slower, CSPN 3x3 2-10 % faster).
        const T* hc = ring.at(slots[r], 0) + r;
        const long cs = ring.channel_stride();
        T* ob = out + b * C * HW + at;
        auto init = [&](long c, long t) {
            V v = V{} + T(0);
            if (awr) v += ld<V>(awr + t) * ld<V>(h0b + c * HW + t);
            if (swr) v += ld<V>(swr + t) * ld<V>(hc + c * cs + t);
            return v;
        };
        // A step too large for the cache (spread) writes its output with non-temporal stores where a vector
        // fills a line: no read for ownership of lines that would be evicted before their reader comes
        // (spreads and put say more).
        auto store = [&](long c, long t, V v) { put(ob + c * HW + t, v, spread); };
        if (stencil) {
            for (int d = 0; d < D; ++d) rows[d] = ring.at(slots[d], 0);
            for (int j = 0; !packed && j < K; ++j) {
                ws[window[j]] = w[j];
                scs[window[j]] = sc[j];
            }
        }
        const int radius = stencil ? r : 0;
        if (packed && rs)
            packed_forward_row<P, true>(r, W, C, K, cs, w.data(), sc.data(), src.data(), window.data(), pack.data(),
                                        wpack.data(), rows.data(), init, store, pf);
        else if (packed)
            packed_forward_row<P, false>(r, W, C, K, cs, w.data(), sc.data(), src.data(), window.data(), pack.data(),
                                         wpack.data(), rows.data(), init, store, pf);
        else if (rs)
            forward_row<P, true>(radius, W, C, K, cs, w.data(), sc.data(), src.data(), ws.data(), scs.data(),
                                 rows.data(), init, store, pf);
        else
            forward_row<P, false>(radius, W, C, K, cs, w.data(), sc.data(), src.data(), ws.data(), scs.data(),
                                  rows.data(), init, store, pf);
    }
    fence_streams();
}

#ifndef SPN_FUSED3
#define SPN_FUSED3 1
#endif

// The whole backward of one row at least R from the top and bottom, radius 1, for rows a whole number of vectors
// wide: grad_h's gather, the weight gradients and the extras in one sweep over the row's chunks, each chunk one
// pass over the channels. Per channel it loads g's three rows and h's three (two aligned vectors each, lane
// shifts for the columns), and g's centre vector serves the gather, every weight gradient, grad_h0, the self
// weight's term and gaw. Apart (backward_rows' passes), g's rows went through L1 three times and grad_h through
// a padded row and a fold pass. CSPN 3x3, the backward alone on preallocated buffers, passes -> one sweep, the
// two builds alternating in one process, 2-core Xeon VM: [4, 11, 192, 256] 2.210 / 2.233 / 2.247 -> 1.949 /
// 1.881 / 1.890 ms; one thread, [2, 11, 192, 256] 1.80 -> 1.67-1.69 ms, [1, 11, 32, 256] (in L2) 0.165 ->
// 0.132-0.136 ms. One step forward+backward through autograd 3.31-3.45 -> 3.01-3.09 ms, T=6 propagate
// 24.98-26.48 -> 23.65-24.97 ms (four rounds). The sweep alone on rows in L1 (a standalone harness) took
// 1.37-1.52 us per 256-column row of 11 channels, 20-22 cycles per channel and chunk at 2.6 GHz; in the
// kernel a row takes about 4 us: the rest is the rings' and the weights' copies and the caches below L1.
// DySPN 3x3 (factored weights), the backward alone at [4, 11, 192, 256]: 2.257 / 2.132 / 2.221 -> 1.816 / 1.844
// / 1.830 ms. SPN_FUSED3=0 builds without it (the A/B above).
//   rows[i]: g's zero-padded ring row y + 1 - i (image column x at [2 + x]); ws[i * 3 + s]: the gather's weight
//   rows by window position, indexed by padded target column (target x at [1 + x]), the centre a row of zeros;
//   hrows[i]: h's replicate-padded ring row y + i - 1 (column x at [1 + x]); wouts[p]: the weight gradients'
//   rows by window position (centre null). gh, gh0: channel 0 of grad_h's and grad_h0's row, channels HW
//   apart; h0 likewise; sw, aw, gsw, gaw: the rows of those maps (null: absent / not wanted).
//   Factored weights (DySPN's, its one ring at radius 1): aff[p], the affinity's rows by window position, and
//   scale, the ring scale's row (ws then hold their products); wouts get the gradient times scale and grs (null:
//   not wanted) the sum over the window of the gradient times aff[p]. aff null: plain weights.
template <class P, typename T>
inline void fused_backward_row3(long W, long C, long HW, long gcs, long hcs, const T* const* rows,
                                const T* const* ws, const T* const* hrows, T* const* wouts, T* gh, T* gh0,
                                const T* h0, const T* sw, const T* aw, T* gsw, T* gaw, const T* const* aff,
                                const T* scale, T* grs, bool accumulate, bool stream_w, bool stream_g,
                                const RowPrefetch& pf) {
    using V = typename P::V;
    constexpr long L = P::lanes;
    using Lanes = std::make_integer_sequence<int, int(L)>;
    for (long u = 0; u < W; u += L) {
        pf.chunk<T>(u, L, W);
        V wv[9], acc[9];
#pragma GCC unroll 9
        for (int p = 0; p < 9; ++p) {
            wv[p] = p == 4 ? V{} + T(0) : ld<V>(ws[p] + u + 1);
            acc[p] = V{} + T(0);
        }
        const V swv = sw ? ld<V>(sw + u) : V{} + T(0), awv = aw ? ld<V>(aw + u) : V{} + T(0);
        V saw = V{} + T(0);
        for (long c = 0; c < C; ++c) {
            V out = V{} + T(0), gy{};
#pragma GCC unroll 3
            for (int i = 0; i < 3; ++i) {
                const T* row = rows[i] + c * gcs + u;
                const V a = ld<V>(row), b = ld<V>(row + L);
                if (i == 1) {
                    gy = lane_shift<2>(a, b, Lanes{});
                    out += wv[3] * lane_shift<1>(a, b, Lanes{}) + wv[5] * lane_shift<3>(a, b, Lanes{});
                } else {
                    out += wv[3 * i] * lane_shift<1>(a, b, Lanes{}) + wv[3 * i + 1] * lane_shift<2>(a, b, Lanes{}) +
                           wv[3 * i + 2] * lane_shift<3>(a, b, Lanes{});
                }
            }
#pragma GCC unroll 3
            for (int i = 0; i < 3; ++i) {
                const T* row = hrows[i] + c * hcs + u;
                const V a = ld<V>(row), b = ld<V>(row + L);
                acc[3 * i] += gy * a;
                acc[3 * i + 1] += gy * lane_shift<1>(a, b, Lanes{});
                acc[3 * i + 2] += gy * lane_shift<2>(a, b, Lanes{});
            }
            if (gaw) saw += gy * ld<V>(h0 + c * HW + u);
            if (sw) out += swv * gy;
            if (gh0) {
                T* o = gh0 + c * HW + u;
                if (accumulate)
                    st(o, ld<V>(o) + awv * gy);
                else
                    put(o, awv * gy, stream_g);
            }
            // the adjoint of the replicate padding: targets x = -1 and x = W fold onto columns 0 and W - 1
            if (u == 0) {
                T left = 0;
                for (int p = 0; p < 9; ++p) left += ws[p][0] * rows[p / 3][c * gcs + p % 3];
                out[0] += left;
            }
            if (u + L == W) {
                T right = 0;
                for (int p = 0; p < 9; ++p) right += ws[p][W + 1] * rows[p / 3][c * gcs + W + 1 + p % 3];
                out[L - 1] += right;
            }
            put(gh + c * HW + u, out, stream_g);
        }
        const V sv = aff ? ld<V>(scale + u) : V{} + T(1);
        V ring = V{} + T(0);
        for (int p = 0; p < 9; ++p) {
            if (p == 4) continue;
            if (aff && grs) ring += acc[p] * ld<V>(aff[p] + u);
            const V d = aff ? acc[p] * sv : acc[p];
            T* o = wouts[p] + u;
            if (accumulate)
                st(o, ld<V>(o) + d);
            else
                put(o, d, stream_w);
        }
        if (aff && grs) st(grs + u, ring);
        if (gsw) st(gsw + u, acc[4]);
        if (gaw) st(gaw + u, saw);
    }
}

template <typename T, class P>
void backward_rows(const T* g, const T* h, const T* h0, const T* nw, const T* rs, const T* sw, const T* aw, T* gh,
                   T* gh0, T* gnw, T* grs, T* gsw, T* gaw, long B, long C, long H, long W, const Offsets& off,
                   bool accumulate, bool spread) {
    using V = typename P::V;
    const long HW = H * W;
    const int K = off.K, r = off.r;
    long begin, end;
    thread_rows(B * H, begin, end);
    // h, replicate-padded by r (weight gradients); g, zero-padded by 2r (grad_h); nw rows, zero-padded by 2r.
    // Their rows are asked for SPN_AHEAD channels ahead of the one copied, not a row ahead (see the row loop).
    RowRing<T> hring(h, C, H, W, r, r, /*replicate=*/true, SPN_AHEAD);
    RowRing<T> gring(g, C, H, W, r, 2 * r, /*replicate=*/false, SPN_AHEAD);
    // grad_h gathers over up to S = K * (r + 1) (target row, neighbour) pairs (border rows: r + 1 target rows).
    const long wide = W + 4 * r, tlen = W + 2 * r;
    const int S = K * (r + 1);
    std::vector<T> nwpad(gh ? S * wide : 0, T(0)), tpad(gh ? C * tlen : 0);
    std::vector<const T*> grow(C), src(S), w(S), wrow(S);
    std::vector<T*> outs(K);
    const long R = r;
    // A row's weight gradients go to a scratch block first, K rows of W, then to grad_nw row by row: copied,
    // added (accumulate: the last chunk of a row overlaps the one before, so chunks store, they cannot add
    // into the output), or for factored weights to the affinity's (times the scale) and the ring scale's
    // (times the affinity, summed over the ring). Stored straight into grad_nw, a chunk's k*k-1 stores went
    // to rows one [H, W] map apart, a multiple of 4 KB, that is to one L1 set (packed_row says more), and each
    // line was evicted between its two halves. The backward alone, direct -> staged, the two builds
    // alternating in one process, 2-core Zen 3 VM, CSPN 3x3 / 7x7: [4, 11, 192, 256] 3.62 / 13.10 -> 2.96 /
    // 9.96 ms and 4.90 / 13.51 -> 3.79 / 10.29 ms, [8, 21, 256, 256] 17.92 / 62.30 -> 16.37 / 43.01 ms,
    // [1, 11, 192, 256] 0.63 / 2.86 -> 0.64 / 2.18 ms. Scratch rows padded by a line apart: no difference.
    // Where the weight gradients are streamed and a vector fills a line (AVX-512), they skip the scratch
    // block (direct): dot_stencil streams each chunk's whole lines into grad_nw, so no line is left half
    // written, and for factored weights sums the ring scale's gradient in its R rows (they stay in L1) from
    // the affinity's lines, asked for two chunks ahead. The backward alone, staged -> direct, the two builds
    // alternating in one process, 2-core Xeon VM (AVX-512), four runs: CSPN 7x7 [4, 11, 192, 256] 7.03 / 7.10
    // / 7.07 / 7.17 -> 6.62 / 6.67 / 6.51 / 6.96 ms, [8, 21, 256, 256] 29.2 / 29.2 / 28.5 / 29.2 -> 27.5 /
    // 27.9 / 26.9 / 27.4 ms; DySPN 7x7 10.23 / 9.51 / 9.87 / 9.67 -> 9.22 / 8.97 / 9.22 / 9.03 ms and 38.2 /
    // 37.1 / 37.9 / 35.8 -> 36.3 / 33.6 / 38.1 / 32.5 ms (the host was slower than in the morning); CSPN 3x3
    // 2.01 / 2.02 / 2.35 / 2.23 -> 2.06 / 1.88 / 2.20 / 2.16 ms. Without the prefetch the DySPN backward was
    // 6 % slower than staged. Adding into grad_nw the same way (the T-step backward's later steps, W a
    // multiple of the vector) was slower: T=6 CSPN 7x7 propagate forward+backward at [8, 11, 96, 128] 51.2 ->
    // 65.4 ms, at [8, 21, 256, 256] 338 -> 367 ms.
    const bool want_w = gnw || grs;
    std::vector<long> slots(2 * r + 1);
    const bool stencil = gh && stencil_fits<P>(r);  // grad_h's gather as forward_rows' stencil
    const int D = 2 * r + 1;
    std::vector<T> zeros(stencil ? tlen : 0, T(0));
    std::vector<const T*> ws(D * D, zeros.data()), rows(D);
    const bool stencil_w = want_w && stencil_fits<P>(r);  // weight gradients by dot_stencil
    // Weight gradients written once (not added up) and too large to stay in cache for their reader bypass
    // the caches (st_stream); a smaller map is better left in L3 for the next step's backward.
    // Where the whole backward is too large for the cache (spread), grad_nw, grad_h and grad_h0 all do
    // (spreads says more).
    const bool stream_w = !accumulate && (spread || streams(B * K * HW * long(sizeof(T))));
    const bool stream_g = !accumulate && spread;
    // Weight gradients streamed straight from dot_stencil into grad_nw (and for factored weights the ring
    // scale's gradient summed there too), not through the scratch block: where they are streamed, each
    // store fills a whole line of a row that starts on one (the scratch block's comment says more: with
    // W no multiple of the vector, rows start off a line and the stores would be plain ones to rows one
    // map apart), and every chunk goes through dot_stencil (no overlapping last chunk).
    const bool direct = gnw && stream_w && sizeof(V) >= 64 && stencil_fits<P>(r) && W % P::lanes == 0 && (!rs || grs);
    std::vector<T> scratch(want_w && !direct ? K * W : 0);  // the scratch block (above)
    std::vector<const T*> hrows(D), fscale(D * D), faff(D * D);
    std::vector<T*> wouts(D * D, nullptr), fgring(D * D);  // by window position; wouts' centre stays null
    RowPrefetch pf(spread && gh);  // spread over grad_h's gather, the one pass over a row's chunks always run
    // Rows r from the border, radius 1, every chunk a whole vector: the one sweep of fused_backward_row3.
    const bool fused = SPN_FUSED3 && r == 1 && stencil && gnw && W % P::lanes == 0 && P::lanes >= 4;
    for (long row = begin; row < end; ++row) {
        const long b = row / H, y = row % H, at = y * W;
        const T* gb = g + b * C * HW + at;
        // g's row: from the ring grad_h's gather reads anyway (copied now) where grad_h is wanted. In the
        // tensor its C rows lie one [H, W] map apart, a multiple of 4 KB, so a chunk's C lines share one L1
        // set (window_row says more); the ring's rows do not. [4, 11, 192, 256], the backward alone,
        // alternating in one process, 2-core EPYC VM, three runs: CSPN 3x3 2.355 / 2.078 / 2.431 -> 2.051 /
        // 2.180 / 2.251 ms, CSPN 7x7 5.876 / 5.782 / 6.310 -> 5.790 / 5.685 / 6.087 ms, DySPN 7x7 the same
        // within noise (7.93 / 7.67 / 8.00 -> 8.09 / 7.47 / 8.28 ms).
        if (gh) {
            const long sy = gring.slot(b, y);
            for (long c = 0; c < C; ++c) grow[c] = gring.at(sy, c) + 2 * r;
        } else {
            for (long c = 0; c < C; ++c) grow[c] = gb + c * HW;
        }
        // What the next row reads first from memory (prefetch_row): its h0 rows. The g and h rows the rings copy
        // in and the weight rows grad_h gathers are asked for while they are copied, SPN_AHEAD rows ahead of the
        // one copied. They used to be asked for here, a row ahead (the 3x3 backward 3.33 -> 2.93 ms, 7x7 8.9 ->
        // 8.6 ms against none, [4, 11, 192, 256]), but those rows lie one [H, W] map apart, a multiple of the
        // L2's 64 KB way at most sizes, so a column's lines fall in one 8-way L2 set (pack_weights says more).
        // A row ahead -> SPN_AHEAD ahead, the backward alone, both builds alternating in one process, 2-core
        // Zen 3 VM, CSPN 3x3 / 7x7, DySPN 7x7: [4, 11, 192, 256] 3.55 / 11.13 / 12.16 -> 3.11 / 10.51 / 11.50 ms
        // and 3.58 / 10.58 / 11.12 -> 3.21 / 9.75 / 10.80 ms; [8, 21, 256, 256] 17.30 / 46.38 / 50.99 -> 16.22
        // / 42.99 / 47.67 ms; [1, 11, 192, 256] 0.634 / 2.297 / 2.741 -> 0.638 / 2.046 / 2.581 ms. The rings
        // alone 2 ahead: 3x3 and 7x7 faster, DySPN the same. In the forward, h's ring copied that way was
        // the same or slower (CSPN 3x3 at [8, 21, 256, 256] 10.97 -> 11.93 ms): it keeps the row ahead.
        // Prefetching the gradients' rows for writing was slower.
        pf.clear();
        if (row + 1 < end) {
            const long nb = (row + 1) / H, ny = (row + 1) % H;
            for (long c = 0; gaw && c < C; ++c) pf.add(h0 + ((nb * C + c) * H + ny) * W, W);
            // Gradients added into (the T-step backward's later steps) are read as well: grad_nw's K rows and
            // grad_h0's C. One batch item (the T-step groups), this backward alone, the two builds alternating,
            // both orders: DySPN 7x7 2.563 -> 2.165 and 2.624 -> 2.189 ms, CSPN 7x7 1.893 -> 1.779 and 1.988
            // -> 1.778 ms, CSPN 3x3 the same; T=6 DySPN 7x7 propagate forward+backward at [4, 11, 192, 256]
            // faster in 5 of 6 pairs (100.7 -> 89.5, 93.3 -> 85.0, 95.0 -> 84.4 ms, ...).
            // grad_nw's K rows are asked for as they are added into, SPN_AHEAD rows ahead, not here (one map
            // apart, like the weight rows). T=6 propagate forward+backward, both builds alternating, Zen 3 VM,
            // CSPN 3x3 / 7x7, DySPN 7x7, ms: [8, 11, 96, 128] 20.6 / 56.5 / 63.0 -> 20.0 / 51.3 / 59.8 and
            // 19.4 / 56.3 / 66.1 -> 18.5 / 55.2 / 60.4; [4, 11, 192, 256] 42.1 / 104.7 / 131.8 -> 42.3 / 106.6
            // / 130.1 and 37.7 / 123.4 / 164.9 -> 36.4 / 114.6 / 157.8.
            if (accumulate) {
                if (gh0)
                    for (long c = 0; c < C; ++c) pf.add(gh0 + ((nb * C + c) * H + ny) * W, W);
            }
        }
        // grad_h of row y: for every unclamped target row v that clamps to y (y itself; also -r..-1 for
        // y = 0 and H..H-1+r for y = H-1) and every neighbour j whose source row q = v - dy_j is in the
        // image, target column u receives nw[j][q][u - dx_j] * g[q][u - dx_j]. Targets u in [-r, W+r) are
        // gathered into tpad[u + r] from the zero-padded rows, then the padding is folded onto columns 0
        // and W-1 (the adjoint of replicate padding).
        // The weight rows are copied zero-padded into nwpad (w[n], the source rows' g at src[n]); rows whose 2r+1
        // source rows are all in the image (inner) take the stencil path: neighbour j's source row q = y - dy_j is
        // stencil row dy_j + r, read at shift r - dx_j (the centre at zero weight). Returns the pairs' count.
        const bool inner = stencil && y >= r && y < H - r;
        auto gather_weights = [&]() {
            const long v_lo = y == 0 ? -r : y, v_hi = y == H - 1 ? H - 1 + r : y;
            int n = 0;  // (v, j) pairs with the source row in the image
            int pairs = 0;  // their weight rows, asked for SPN_AHEAD ahead of the one copied
            for (long v = v_lo; v <= v_hi; ++v)
                for (int j = 0; j < K; ++j)
                    if (const long q = v - off.dy[j]; q >= 0 && q < H) wrow[pairs++] = nw + (b * K + j) * HW + q * W;
            for (int q = 0; q < std::min(pairs, SPN_AHEAD); ++q) prefetch_row(wrow[q], W);
            for (long v = v_lo; v <= v_hi; ++v) {
                for (int j = 0; j < K; ++j) {
                    const long q = v - off.dy[j];
                    if (q < 0 || q >= H) continue;
                    if (n + SPN_AHEAD < pairs) prefetch_row(wrow[n + SPN_AHEAD], W);
                    T* pad = nwpad.data() + n * wide;
                    const T* a = wrow[n];
                    if (rs) {  // the effective weight row: affinity times its ring's scale
                        const T* scale = rs + (b * R + off.ring[j]) * HW + q * W;
                        for (long x = 0; x < W; ++x) pad[2 * r + x] = a[x] * scale[x];
                    } else {
                        std::memcpy(pad + 2 * r, a, sizeof(T) * W);
                    }
                    w[n] = pad + r - off.dx[j];
                    const long slot = gring.slot(b, q);
                    src[n] = gring.at(slot, 0) + r - off.dx[j];
                    ++n;
                }
            }
            if (inner) {
                for (int d = -r; d <= r; ++d) rows[d + r] = gring.at(gring.slot(b, y - d), 0);
                for (int j = 0; j < K; ++j) ws[(off.dy[j] + r) * D + r - off.dx[j]] = w[j];
            }
            return n;
        };
        if constexpr (stencil_fits<P>(1)) {
          if (fused && inner) {
            for (int d = -r; d <= r; ++d) hrows[d + r] = hring.at(hring.slot(b, y + d), 0);
            gather_weights();  // an inner row: neighbour j is pair j, its padded weight row ws' by window position
            for (int j = 0; j < K; ++j) {  // grad_nw's and the affinity's rows by window position
                wouts[(off.dy[j] + r) * D + off.dx[j] + r] = gnw + (b * K + j) * HW + at;
                faff[(off.dy[j] + r) * D + off.dx[j] + r] = nw + (b * K + j) * HW + at;
            }
            const long item = b * C * HW + at, plane = b * HW + at;
            fused_backward_row3<P>(W, C, HW, gring.channel_stride(), hring.channel_stride(), rows.data(), ws.data(),
                                   hrows.data(), wouts.data(), gh + item, gh0 ? gh0 + item : nullptr, h0 ? h0 + item : nullptr,
                                   sw ? sw + plane : nullptr, aw ? aw + plane : nullptr, gsw ? gsw + plane : nullptr,
                                   gaw ? gaw + plane : nullptr, rs ? faff.data() : nullptr,
                                   rs ? rs + plane : nullptr, grs ? grs + plane : nullptr, accumulate, stream_w,
                                   stream_g, pf);
            continue;
          }
        }
        Extras<T> e;  // with the weight gradients where they are wanted, else on their own below
        e.gsw = gsw ? gsw + b * HW + at : nullptr;
        e.gaw = gaw ? gaw + b * HW + at : nullptr;
        e.h0 = h0 + b * C * HW + at;
        e.hs = HW;
        if (want_w) {  // d nw[j] = sum_c g[c] * shift_j(h[c])
            for (int d = -r; d <= r; ++d) slots[d + r] = hring.slot(b, y + d);
            for (int j = 0; j < K; ++j) {
                outs[j] = direct ? gnw + (b * K + j) * HW + at : scratch.data() + j * W;
                src[j] = hring.at(slots[off.dy[j] + r], 0) + r + off.dx[j];
            }
            if (stencil_w) {
                for (int d = 0; d < D; ++d) hrows[d] = hring.at(slots[d], 0);
                for (int j = 0; j < K; ++j) wouts[(off.dy[j] + r) * D + off.dx[j] + r] = outs[j];
            }
            if (rs && grs)  // the ring scale's gradient rows, summed into by either path below
                for (long q = 0; q < R; ++q) std::fill_n(grs + (b * R + q) * HW + at, W, T(0));
            if (direct && rs) {
                for (int j = 0; j < K; ++j) {
                    const int p = (off.dy[j] + r) * D + off.dx[j] + r;
                    fscale[p] = rs + (b * R + off.ring[j]) * HW + at;
                    faff[p] = nw + (b * K + j) * HW + at;
                    fgring[p] = grs + (b * R + off.ring[j]) * HW + at;
                }
                e.scale = fscale.data();
                e.aff = faff.data();
                e.gring = fgring.data();
            }
            dot_row<P>(stencil_w ? r : 0, W, C, K, hring.channel_stride(), grow.data(), src.data(), outs.data(),
                       hrows.data(), wouts.data(), hring.at(slots[r], 0) + r, e, direct);
            if (rs && !direct) {
                // The ring scale's gradient reads the affinity's K rows of this row, one map apart: asked for
                // SPN_AHEAD ahead (the row loop says why). DySPN's backward alone, both builds alternating, Zen 3
                // VM: 7x7 at [4, 11, 192, 256] 17.01 / 16.80 / 15.74 -> 16.38 / 15.46 / 15.49 ms (three runs),
                // at [8, 21, 256, 256] 53.37 -> 49.46 ms; 5x5 6.55 -> 6.17 and 30.13 -> 28.99 ms.
                for (int j = 0; grs && j < std::min(K, SPN_AHEAD); ++j) prefetch_row(nw + (b * K + j) * HW + at, W);
                const bool added = accumulate && gnw;  // grad_nw's rows are read too (the row loop says more)
                for (int j = 0; added && j < std::min(K, SPN_AHEAD); ++j) prefetch_row(gnw + (b * K + j) * HW + at, W);
                for (int j = 0; j < K; ++j) {
                    if (grs && j + SPN_AHEAD < K) prefetch_row(nw + (b * K + j + SPN_AHEAD) * HW + at, W);
                    if (added && j + SPN_AHEAD < K) prefetch_row(gnw + (b * K + j + SPN_AHEAD) * HW + at, W);
                    const long ring_row = (b * R + off.ring[j]) * HW + at;
                    const T* __restrict__ d = outs[j];
                    if (gnw) {
                        const T* __restrict__ scale = rs + ring_row;
                        T* __restrict__ ga = gnw + (b * K + j) * HW + at;
                        if (accumulate) {
                            for (long x = 0; x < W; ++x) ga[x] += d[x] * scale[x];
                        } else {
                            long x = 0;
                            for (; stream_w && x + P::lanes <= W; x += P::lanes)
                                st_stream(ga + x, ld<V>(d + x) * ld<V>(scale + x));
                            for (; x < W; ++x) ga[x] = d[x] * scale[x];
                        }
                    }
                    if (grs) {
                        const T* __restrict__ a = nw + (b * K + j) * HW + at;
                        T* __restrict__ gr = grs + ring_row;
                        for (long x = 0; x < W; ++x) gr[x] += d[x] * a[x];
                    }
                }
            } else if (accumulate && gnw) {
                for (int j = 0; j < std::min(K, SPN_AHEAD); ++j) prefetch_row(gnw + (b * K + j) * HW + at, W);
                for (int j = 0; j < K; ++j) {
                    if (j + SPN_AHEAD < K) prefetch_row(gnw + (b * K + j + SPN_AHEAD) * HW + at, W);
                    const T* __restrict__ d = outs[j];
                    T* __restrict__ o = gnw + (b * K + j) * HW + at;
                    for (long x = 0; x < W; ++x) o[x] += d[x];
                }
            } else if (gnw && !direct) {
                for (int j = 0; j < K; ++j) {
                    const T* __restrict__ d = outs[j];
                    T* __restrict__ o = gnw + (b * K + j) * HW + at;
                    long x = 0;
                    for (; stream_w && x + P::lanes <= W; x += P::lanes) st_stream(o + x, ld<V>(d + x));
                    for (; x < W; ++x) o[x] = d[x];
                }
            }
        }
        if (!want_w && (e.gsw || e.gaw))  // h's channels from the tensor, one map apart
            for_chunks<P::lanes>(W, [&](long t) { extras_chunk<P>(t, C, grow.data(), h + b * C * HW + at, HW, e); });
        if (gh0) {
            const T* __restrict__ awr = aw + b * HW + at;
            for (long c = 0; c < C; ++c) {
                const T* __restrict__ gc = grow[c];
                T* __restrict__ o = gh0 + (b * C + c) * HW + at;
                if (accumulate) {
                    for (long x = 0; x < W; ++x) o[x] += gc[x] * awr[x];
                } else {
                    long x = 0;
                    for (; stream_g && x + P::lanes <= W; x += P::lanes)
                        st_stream(o + x, ld<V>(gc + x) * ld<V>(awr + x));
                    for (; x < W; ++x) o[x] = gc[x] * awr[x];
                }
            }
        }
        if (!gh) continue;
        auto zero = [&](long, long) { return V{} + T(0); };
        auto store = [&](long c, long t, V a) { st(tpad.data() + c * tlen + t, a); };
        const int n = gather_weights();
        forward_row<P, false>(inner ? r : 0, tlen, C, n, gring.channel_stride(), w.data(), w.data(), src.data(),
                              ws.data(), ws.data(), rows.data(), zero, store, pf);
        const T* swr = sw ? sw + b * HW + at : nullptr;
        for (long c = 0; c < C; ++c) {
            const T* tp = tpad.data() + c * tlen;
            T* o = gh + (b * C + c) * HW + at;
            T left = 0, right = 0;
            for (long u = 0; u < r; ++u) {
                left += tp[u];
                right += tp[W + r + u];
            }
            if constexpr (P::lanes > 1) {
                if (stream_g && W % P::lanes == 0) {  // the border folds added in the end vectors' lanes
                    for (long x = 0; x < W; x += P::lanes) {
                        V v = ld<V>(tp + r + x);
                        if (swr) v += ld<V>(swr + x) * ld<V>(grow[c] + x);
                        if (x == 0) v[0] += left;
                        if (x + P::lanes == W) v[P::lanes - 1] += right;
                        st_stream(o + x, v);
                    }
                    continue;
                }
            }
            for (long x = 0; x < W; ++x) o[x] = tp[x + r] + (swr ? swr[x] * grow[c][x] : T(0));
            o[0] += left;
            o[W - 1] += right;
        }
    }
    fence_streams();  // st_stream's stores are seen by the threads that read them next
}

// cache_bytes: the size of the last-level cache, for spreads().
template <typename T>
void forward(const T* h, const T* h0, const T* nw, const T* rs, const T* sw, const T* aw, T* out, long B, long C,
             long H, long W, int k, int threads, long cache_bytes) {
    const Offsets off(k);
    const long bytes = step_bytes(B, C, H * W, off.K, off.r, rs != nullptr, sw != nullptr, aw != nullptr, sizeof(T));
    const bool spread = spreads(bytes, cache_bytes);
#pragma omp parallel num_threads(std::max(1, threads))
    {
        if (W >= Wide<T>::lanes)
            forward_rows<T, Wide<T>>(h, h0, nw, rs, sw, aw, out, B, C, H, W, off, spread);
        else
            forward_rows<T, Narrow<T>>(h, h0, nw, rs, sw, aw, out, B, C, H, W, off, spread);
    }
}

template <typename T>
void backward(const T* g, const T* h, const T* h0, const T* nw, const T* rs, const T* sw, const T* aw, T* gh, T* gh0,
              T* gnw, T* grs, T* gsw, T* gaw, long B, long C, long H, long W, int k, int threads, bool accumulate,
              long cache_bytes) {
    const Offsets off(k);
    const long bytes = step_bytes(B, C, H * W, off.K, off.r, rs != nullptr, sw != nullptr, aw != nullptr, sizeof(T));
    const bool spread = spreads(2 * bytes, cache_bytes);
#pragma omp parallel num_threads(std::max(1, threads))
    {
        if (W >= Wide<T>::lanes)
            backward_rows<T, Wide<T>>(g, h, h0, nw, rs, sw, aw, gh, gh0, gnw, grs, gsw, gaw, B, C, H, W, off,
                                      accumulate, spread);
        else
            backward_rows<T, Narrow<T>>(g, h, h0, nw, rs, sw, aw, gh, gh0, gnw, grs, gsw, gaw, B, C, H, W, off,
                                        accumulate, spread);
    }
}

// CSPN's normalisation of a [B, K, H, W] affinity (propagation._CSPNNormalise), per block of pixels of one
// batch item: s = sum_j |a_j| and S = sum_j a_j in channel order (s as the torch path's one-channel-at-a-
// time sum, bit for bit; S rounds differently from its affinity.sum(dim=1), within 1e-6 in float32),
// inv = 1 / max(s, floor), kappa_j = a_j * inv. The block's K affinity rows (K * 2 KB) are read from memory
// once and again from L2 for kappa; torch's ops pass over the whole affinity three times (abs-sum, sum,
// multiply). Outputs kappa [B, K, HW] and abs_sum, inv, total [B, HW].
constexpr long kNormBlock = 512;  // pixels per block (2048 and 8192 measured no different)

template <typename T>
void cspn_normalise(const T* a, T* kappa, T* abs_sum, T* inv, T* total, long B, long K, long HW, double floor,
                    int threads) {
    using V = typename Wide<T>::V;
    constexpr long lanes = Wide<T>::lanes;
    const long per = (HW + kNormBlock - 1) / kNormBlock;
    const bool stream = streams(B * K * HW * long(sizeof(T)));
    const T lo = T(floor);
#pragma omp parallel num_threads(std::max(1, threads))
    {
#pragma omp for schedule(static)
        for (long blk = 0; blk < B * per; ++blk) {
            const long b = blk / per, x0 = blk % per * kNormBlock, n = std::min(kNormBlock, HW - x0);
            T* __restrict__ s = abs_sum + b * HW + x0;
            T* __restrict__ tot = total + b * HW + x0;
            T* __restrict__ iv = inv + b * HW + x0;
            std::fill_n(s, n, T(0));
            std::fill_n(tot, n, T(0));
            for (long j = 0; j < K; ++j) {
                const T* __restrict__ aj = a + (b * K + j) * HW + x0;
                for (long x = 0; x < n; ++x) {
                    s[x] += aj[x] < T(0) ? -aj[x] : aj[x];
                    tot[x] += aj[x];
                }
            }
            for (long x = 0; x < n; ++x) iv[x] = T(1) / (s[x] < lo ? lo : s[x]);  // s NaN: NaN, as clamp_min
            for (long j = 0; j < K; ++j) {
                const T* __restrict__ aj = a + (b * K + j) * HW + x0;
                T* __restrict__ kj = kappa + (b * K + j) * HW + x0;
                long x = 0;
                for (; x + lanes <= n; x += lanes) put(kj + x, ld<V>(aj + x) * ld<V>(iv + x), stream);
                for (; x < n; ++x) kj[x] = aj[x] * iv[x];
            }
        }
        fence_streams();
    }
}

// Its backward: with G the gradient of kappa (null: zero), g that of the centre weight 1 - inv * S (null:
// zero), P = sum_j G_j a_j and q = (P - g S) inv^2 [s > floor]:   out_j = G_j inv - g inv - sign(a_j) q.
// One read of a and G per block from memory (P's pass), one from L2 (out's), out written once.
template <typename T>
void cspn_normalise_backward(const T* a, const T* G, const T* g, const T* abs_sum, const T* inv, const T* total,
                             T* out, long B, long K, long HW, double floor, int threads) {
    using V = typename Wide<T>::V;
    constexpr long lanes = Wide<T>::lanes;
    const long per = (HW + kNormBlock - 1) / kNormBlock;
    const bool stream = streams(B * K * HW * long(sizeof(T)));
#pragma omp parallel num_threads(std::max(1, threads))
    {
        std::vector<T> qbuf(kNormBlock), cbuf(kNormBlock);
#pragma omp for schedule(static)
        for (long blk = 0; blk < B * per; ++blk) {
            const long b = blk / per, x0 = blk % per * kNormBlock, n = std::min(kNormBlock, HW - x0);
            const long at = b * HW + x0;
            T* __restrict__ q = qbuf.data();  // P, then q
            T* __restrict__ c = cbuf.data();  // g * inv
            std::fill_n(q, n, T(0));
            if (G)
                for (long j = 0; j < K; ++j) {
                    const T* __restrict__ aj = a + (b * K + j) * HW + x0;
                    const T* __restrict__ Gj = G + (b * K + j) * HW + x0;
                    for (long x = 0; x < n; ++x) q[x] += Gj[x] * aj[x];
                }
            for (long x = 0; x < n; ++x) {
                const T gx = g ? g[at + x] : T(0), iv = inv[at + x];
                q[x] = abs_sum[at + x] > T(floor) ? (q[x] - gx * total[at + x]) * iv * iv : T(0);
                c[x] = gx * iv;
            }
            for (long j = 0; j < K; ++j) {
                const T* __restrict__ aj = a + (b * K + j) * HW + x0;
                const T* __restrict__ Gj = G ? G + (b * K + j) * HW + x0 : nullptr;
                const T* __restrict__ iv = inv + at;
                T* __restrict__ oj = out + (b * K + j) * HW + x0;
                long x = 0;
                for (; x + lanes <= n; x += lanes) {
                    const V gk = Gj ? ld<V>(Gj + x) * ld<V>(iv + x) : V{} + T(0);
                    put(oj + x, gk - ld<V>(c + x) - sign_of(ld<V>(aj + x)) * ld<V>(q + x), stream);
                }
                for (; x < n; ++x) {
                    const T sg = T(aj[x] > T(0)) - T(aj[x] < T(0));
                    oj[x] = (Gj ? Gj[x] * iv[x] : T(0)) - c[x] - sg * q[x];
                }
            }
        }
        fence_streams();
    }
}

// DySPN's ring sums of a [B, K, H, W] affinity (propagation._RingSums): per ring q of the window,
// sum[q] = sum_{j in q} a_j and abs_sum[q] = sum_{j in q} |a_j| (j in order, as torch's loop), [B, R, HW]
// each; per block of pixels the affinity is read once.
template <typename T>
void ring_sums(const T* a, T* sum, T* abs_sum, long B, int k, long HW, int threads) {
    const Offsets off(k);
    const long K = off.K, R = off.r, per = (HW + kNormBlock - 1) / kNormBlock;
#pragma omp parallel for schedule(static) num_threads(std::max(1, threads))
    for (long blk = 0; blk < B * per; ++blk) {
        const long b = blk / per, x0 = blk % per * kNormBlock, n = std::min(kNormBlock, HW - x0);
        for (long q = 0; q < R; ++q) {
            std::fill_n(sum + (b * R + q) * HW + x0, n, T(0));
            std::fill_n(abs_sum + (b * R + q) * HW + x0, n, T(0));
        }
        for (long j = 0; j < K; ++j) {
            const T* __restrict__ aj = a + (b * K + j) * HW + x0;
            T* __restrict__ s = sum + (b * R + off.ring[j]) * HW + x0;
            T* __restrict__ m = abs_sum + (b * R + off.ring[j]) * HW + x0;
            for (long x = 0; x < n; ++x) {
                s[x] += aj[x];
                m[x] += aj[x] < T(0) ? -aj[x] : aj[x];
            }
        }
    }
}

// Its backward: out_j = sign(a_j) * g_abs[ring(j)] + g_sum[ring(j)], either gradient null for zero, plus
// addend_j where given (a [B, K, HW] gradient of the affinity from elsewhere: DySPN's weights node adds the
// propagation's in this pass instead of one of its own over three maps). Batch item b of out starts at
// out + b * out_stride (the affinity's channels of a guidance-sized gradient: out_stride is its channel count
// times HW). out is written once (non-temporal from 32 MB on, as cspn_normalise's).
template <typename T>
void ring_sums_backward(const T* a, const T* g_sum, const T* g_abs, const T* addend, T* out, long B, int k, long HW,
                        long out_stride, int threads) {
    using V = typename Wide<T>::V;
    constexpr long lanes = Wide<T>::lanes;
    const Offsets off(k);
    const long K = off.K, R = off.r, per = (HW + kNormBlock - 1) / kNormBlock;
    const bool stream = streams(B * K * HW * long(sizeof(T)));
#pragma omp parallel num_threads(std::max(1, threads))
    {
#pragma omp for schedule(static)
        for (long blk = 0; blk < B * per; ++blk) {
            const long b = blk / per, x0 = blk % per * kNormBlock, n = std::min(kNormBlock, HW - x0);
            for (long j = 0; j < K; ++j) {
                const long ring = (b * R + off.ring[j]) * HW + x0;
                const T* __restrict__ aj = a + (b * K + j) * HW + x0;
                const T* __restrict__ gs = g_sum ? g_sum + ring : nullptr;
                const T* __restrict__ ga = g_abs ? g_abs + ring : nullptr;
                const T* __restrict__ dj = addend ? addend + (b * K + j) * HW + x0 : nullptr;
                T* __restrict__ oj = out + b * out_stride + j * HW + x0;
                long x = 0;
                for (; x + lanes <= n; x += lanes) {
                    V v = gs ? ld<V>(gs + x) : V{} + T(0);
                    if (ga) v += sign_of(ld<V>(aj + x)) * ld<V>(ga + x);
                    if (dj) v += ld<V>(dj + x);
                    put(oj + x, v, stream);
                }
                for (; x < n; ++x) {
                    const T sg = T(aj[x] > T(0)) - T(aj[x] < T(0));
                    const T v = (gs ? gs[x] : T(0)) + (ga ? sg * ga[x] : T(0));
                    oj[x] = dj ? v + dj[x] : v;
                }
            }
        }
        fence_streams();
    }
}

// dyspn_step_weights' s and Q (below) of the n pixels from x0 of batch item b, into sbuf and qbuf.
template <typename T>
inline void step_sums(const T* att, const T* S, const T* A, long b, long R, long HW, long x0, long n, T eps, T* sbuf,
                      T* qbuf) {
    std::fill_n(sbuf, n, T(0));
    std::fill_n(qbuf, n, T(0));
    for (long r = 0; r < R; ++r) {
        const T* __restrict__ a = att + (b * (R + 1) + r) * HW + x0;
        const T* __restrict__ ar = A + (b * R + r) * HW + x0;
        const T* __restrict__ sr = S + (b * R + r) * HW + x0;
        for (long x = 0; x < n; ++x) {
            sbuf[x] += a[x] * ar[x];
            qbuf[x] += a[x] * sr[x];
        }
    }
    const T* __restrict__ p = att + (b * (R + 1) + R) * HW + x0;
    for (long x = 0; x < n; ++x) sbuf[x] = sbuf[x] + p[x] + eps;
}

// One DySPN step's weights from its attention (propagation._DySPNStepWeights): with a_r = att[r] (r < R),
// p = att[R], A / S the ring abs sums / sums, s = sum_r a_r A_r + p + eps and Q = sum_r a_r S_r:
//   self = p / s,  anchor = (s - Q - p) / s,  scale[r] = a_r / s,
// as dyspn_factored_weights' torch ops (r in order), one pass per block of pixels instead of some twenty
// passes of torch ops over [B, 1..R, H, W] maps forward and backward. att is [B, R+1, HW], A and S and scale
// [B, R, HW], self and anchor [B, HW].
template <typename T>
void dyspn_step_weights(const T* att, const T* S, const T* A, T* sw, T* aw, T* scale, long B, long R, long HW,
                        double eps, int threads) {
    const long per = (HW + kNormBlock - 1) / kNormBlock;
#pragma omp parallel for schedule(static) num_threads(std::max(1, threads))
    for (long blk = 0; blk < B * per; ++blk) {
        const long b = blk / per, x0 = blk % per * kNormBlock, n = std::min(kNormBlock, HW - x0);
        T sbuf[kNormBlock], qbuf[kNormBlock];
        step_sums(att, S, A, b, R, HW, x0, n, T(eps), sbuf, qbuf);
        const T* __restrict__ p = att + (b * (R + 1) + R) * HW + x0;
        T* __restrict__ so = sw + b * HW + x0;
        T* __restrict__ ao = aw + b * HW + x0;
        for (long x = 0; x < n; ++x) {
            so[x] = p[x] / sbuf[x];
            ao[x] = (sbuf[x] - qbuf[x] - p[x]) / sbuf[x];
        }
        for (long r = 0; r < R; ++r) {
            const T* __restrict__ a = att + (b * (R + 1) + r) * HW + x0;
            T* __restrict__ o = scale + (b * R + r) * HW + x0;
            for (long x = 0; x < n; ++x) o[x] = a[x] / sbuf[x];
        }
    }
}

// Its backward, from the gradients of self, anchor and scale (any null: zero), with G = (-p gs + (Q + p) ga
// - sum_r a_r gr_r) / s^2:  d p = (gs - ga) / s + G,  d a_r = (gr_r - ga S_r) / s + A_r G,  d A_r = a_r G,
// d S_r = -ga a_r / s. Writes g_att [B, R+1, HW], g_S and g_A [B, R, HW] (null: not wanted). Batch item b of
// g_att starts at g_att + b * att_stride. With `logits` the attention is a sigmoid's output and g_att gets the
// gradient of its logits instead, d att * (1 - att) * att in torch's sigmoid_backward's order (DySPN's weights
// node writes it straight into the guidance's gradient: att_stride its channel count times HW).
template <typename T>
void dyspn_step_weights_backward(const T* att, const T* S, const T* A, const T* gsw, const T* gaw, const T* gscale,
                                 T* g_att, T* g_S, T* g_A, long B, long R, long HW, long att_stride, bool logits,
                                 double eps, int threads) {
    const long per = (HW + kNormBlock - 1) / kNormBlock;
#pragma omp parallel for schedule(static) num_threads(std::max(1, threads))
    for (long blk = 0; blk < B * per; ++blk) {
        const long b = blk / per, x0 = blk % per * kNormBlock, n = std::min(kNormBlock, HW - x0);
        T sbuf[kNormBlock], qbuf[kNormBlock], gbuf[kNormBlock];
        step_sums(att, S, A, b, R, HW, x0, n, T(eps), sbuf, qbuf);
        std::fill_n(gbuf, n, T(0));  // - sum_r a_r gr_r
        for (long r = 0; gscale && r < R; ++r) {
            const T* __restrict__ a = att + (b * (R + 1) + r) * HW + x0;
            const T* __restrict__ gr = gscale + (b * R + r) * HW + x0;
            for (long x = 0; x < n; ++x) gbuf[x] -= a[x] * gr[x];
        }
        const T* __restrict__ p = att + (b * (R + 1) + R) * HW + x0;
        const T* __restrict__ gs = gsw ? gsw + b * HW + x0 : nullptr;
        const T* __restrict__ ga = gaw ? gaw + b * HW + x0 : nullptr;
        T* __restrict__ gp = g_att ? g_att + b * att_stride + R * HW + x0 : nullptr;
        for (long x = 0; x < n; ++x) {
            const T sp = sbuf[x], gsx = gs ? gs[x] : T(0), gax = ga ? ga[x] : T(0);
            const T G = (gbuf[x] - p[x] * gsx + (qbuf[x] + p[x]) * gax) / (sp * sp);
            gbuf[x] = G;
            if (gp) {
                const T v = (gsx - gax) / sp + G;
                gp[x] = logits ? v * (T(1) - p[x]) * p[x] : v;
            }
        }
        for (long r = 0; r < R; ++r) {
            const T* __restrict__ a = att + (b * (R + 1) + r) * HW + x0;
            const T* __restrict__ ar = A + (b * R + r) * HW + x0;
            const T* __restrict__ sr = S + (b * R + r) * HW + x0;
            const T* __restrict__ gr = gscale ? gscale + (b * R + r) * HW + x0 : nullptr;
            T* __restrict__ ga_r = g_att ? g_att + b * att_stride + r * HW + x0 : nullptr;
            T* __restrict__ gA_r = g_A ? g_A + (b * R + r) * HW + x0 : nullptr;
            T* __restrict__ gS_r = g_S ? g_S + (b * R + r) * HW + x0 : nullptr;
            for (long x = 0; x < n; ++x) {
                const T gax = ga ? ga[x] : T(0);
                if (ga_r) {
                    const T v = ((gr ? gr[x] : T(0)) - gax * sr[x]) / sbuf[x] + ar[x] * gbuf[x];
                    ga_r[x] = logits ? v * (T(1) - a[x]) * a[x] : v;
                }
                if (gA_r) gA_r[x] = a[x] * gbuf[x];
                if (gS_r) gS_r[x] = -gax * a[x] / sbuf[x];
            }
        }
    }
}

// The streaming floor of a step's traffic (benchmarks/bench_propagation.py), no arithmetic but the reads'
// sum: for every row (b, y) of the [B, *, H, W] maps, in the kernels' order (each thread a block of rows),
// reads row y of each of the in_ch[i] channels of every input ins[i] and writes row y of each channel of
// every output outs[o], with non-temporal stores where the kernels would stream (spreads: the step moves
// more than half of cache_bytes). Plain vector loads and stores, no software prefetch: what the hardware
// gives these 30-80 row streams without help. Returns the sum read (so that nothing is left out).
template <typename T>
double stream_rows(const T* const* ins, const long* in_ch, int n_in, T* const* outs, const long* out_ch, int n_out,
                   long B, long H, long W, long cache_bytes, int threads) {
    using V = typename Wide<T>::V;
    constexpr long lanes = Wide<T>::lanes;
    const long HW = H * W;
    long maps = 0;
    for (int i = 0; i < n_in; ++i) maps += in_ch[i];
    for (int o = 0; o < n_out; ++o) maps += out_ch[o];
    const bool stream = spreads(B * maps * HW * long(sizeof(T)), cache_bytes);
    double total = 0;
#pragma omp parallel num_threads(std::max(1, threads)) reduction(+ : total)
    {
        long begin, end;
        thread_rows(B * H, begin, end);
        V acc = V{} + T(0);
        T tail = 0;
        for (long row = begin; row < end; ++row) {
            const long b = row / H, y = row % H;
            for (int i = 0; i < n_in; ++i)
                for (long c = 0; c < in_ch[i]; ++c) {
                    const T* p = ins[i] + (b * in_ch[i] + c) * HW + y * W;
                    long x = 0;
                    for (; x + lanes <= W; x += lanes) acc += ld<V>(p + x);
                    for (; x < W; ++x) tail += p[x];
                }
            for (int o = 0; o < n_out; ++o)
                for (long c = 0; c < out_ch[o]; ++c) {
                    T* p = outs[o] + (b * out_ch[o] + c) * HW + y * W;
                    long x = 0;
                    for (; x + lanes <= W; x += lanes) put(p + x, acc, stream);
                    for (; x < W; ++x) p[x] = tail;
                }
        }
        fence_streams();
        for (long l = 0; l < lanes; ++l) total += double(acc[l]);
        total += double(tail);
    }
    return total;
}

}  // namespace

// Pointers: nw is the neighbour weight (or the affinity where rs is given); rs, sw, aw may be null; of
// the gradients, any output may be null (not computed), grs only means something with rs. With
// accumulate != 0 the backward adds gnw and gh0 into what those buffers hold (the steps of one
// propagation share nw and h0: one buffer for all their gradients); the others are overwritten.
// cache_bytes: the last-level cache's size, for the choice of RowPrefetch (results do not depend on it).
extern "C" {

int spn_abi_version() { return 11; }

int spn_vector_bytes() { return SPN_VBYTES; }

double spn_stream_rows_f32(const float* const* ins, const long* in_ch, int n_in, float* const* outs, const long* out_ch,
                           int n_out, long B, long H, long W, long cache_bytes, int threads) {
    return stream_rows<float>(ins, in_ch, n_in, outs, out_ch, n_out, B, H, W, cache_bytes, threads);
}

void spn_forward_f32(const float* h, const float* h0, const float* nw, const float* rs, const float* sw,
                     const float* aw, float* out, long B, long C, long H, long W, int k, int threads,
                     long cache_bytes) {
    forward<float>(h, h0, nw, rs, sw, aw, out, B, C, H, W, k, threads, cache_bytes);
}

void spn_forward_f64(const double* h, const double* h0, const double* nw, const double* rs, const double* sw,
                     const double* aw, double* out, long B, long C, long H, long W, int k, int threads,
                     long cache_bytes) {
    forward<double>(h, h0, nw, rs, sw, aw, out, B, C, H, W, k, threads, cache_bytes);
}

void spn_backward_f32(const float* g, const float* h, const float* h0, const float* nw, const float* rs,
                      const float* sw, const float* aw, float* gh, float* gh0, float* gnw, float* grs, float* gsw,
                      float* gaw, long B, long C, long H, long W, int k, int threads, int accumulate,
                      long cache_bytes) {
    backward<float>(g, h, h0, nw, rs, sw, aw, gh, gh0, gnw, grs, gsw, gaw, B, C, H, W, k, threads, accumulate != 0,
                    cache_bytes);
}

void spn_backward_f64(const double* g, const double* h, const double* h0, const double* nw, const double* rs,
                      const double* sw, const double* aw, double* gh, double* gh0, double* gnw, double* grs,
                      double* gsw, double* gaw, long B, long C, long H, long W, int k, int threads,
                      int accumulate, long cache_bytes) {
    backward<double>(g, h, h0, nw, rs, sw, aw, gh, gh0, gnw, grs, gsw, gaw, B, C, H, W, k, threads,
                     accumulate != 0, cache_bytes);
}

void spn_cspn_normalise_f32(const float* a, float* kappa, float* abs_sum, float* inv, float* total, long B, long K,
                            long HW, double floor, int threads) {
    cspn_normalise<float>(a, kappa, abs_sum, inv, total, B, K, HW, floor, threads);
}

void spn_cspn_normalise_f64(const double* a, double* kappa, double* abs_sum, double* inv, double* total, long B,
                            long K, long HW, double floor, int threads) {
    cspn_normalise<double>(a, kappa, abs_sum, inv, total, B, K, HW, floor, threads);
}

void spn_cspn_normalise_backward_f32(const float* a, const float* G, const float* g, const float* abs_sum,
                                     const float* inv, const float* total, float* out, long B, long K, long HW,
                                     double floor, int threads) {
    cspn_normalise_backward<float>(a, G, g, abs_sum, inv, total, out, B, K, HW, floor, threads);
}

void spn_cspn_normalise_backward_f64(const double* a, const double* G, const double* g, const double* abs_sum,
                                     const double* inv, const double* total, double* out, long B, long K, long HW,
                                     double floor, int threads) {
    cspn_normalise_backward<double>(a, G, g, abs_sum, inv, total, out, B, K, HW, floor, threads);
}

void spn_ring_sums_f32(const float* a, float* sum, float* abs_sum, long B, int k, long HW, int threads) {
    ring_sums<float>(a, sum, abs_sum, B, k, HW, threads);
}

void spn_ring_sums_f64(const double* a, double* sum, double* abs_sum, long B, int k, long HW, int threads) {
    ring_sums<double>(a, sum, abs_sum, B, k, HW, threads);
}

void spn_ring_sums_backward_f32(const float* a, const float* g_sum, const float* g_abs, const float* addend, float* out,
                                long B, int k, long HW, long out_stride, int threads) {
    ring_sums_backward<float>(a, g_sum, g_abs, addend, out, B, k, HW, out_stride, threads);
}

void spn_ring_sums_backward_f64(const double* a, const double* g_sum, const double* g_abs, const double* addend,
                                double* out, long B, int k, long HW, long out_stride, int threads) {
    ring_sums_backward<double>(a, g_sum, g_abs, addend, out, B, k, HW, out_stride, threads);
}

void spn_dyspn_step_weights_f32(const float* att, const float* S, const float* A, float* sw, float* aw, float* scale,
                                long B, long R, long HW, double eps, int threads) {
    dyspn_step_weights<float>(att, S, A, sw, aw, scale, B, R, HW, eps, threads);
}

void spn_dyspn_step_weights_f64(const double* att, const double* S, const double* A, double* sw, double* aw,
                                double* scale, long B, long R, long HW, double eps, int threads) {
    dyspn_step_weights<double>(att, S, A, sw, aw, scale, B, R, HW, eps, threads);
}

void spn_dyspn_step_weights_backward_f32(const float* att, const float* S, const float* A, const float* gsw,
                                         const float* gaw, const float* gscale, float* g_att, float* g_S, float* g_A,
                                         long B, long R, long HW, long att_stride, int logits, double eps,
                                         int threads) {
    dyspn_step_weights_backward<float>(att, S, A, gsw, gaw, gscale, g_att, g_S, g_A, B, R, HW, att_stride, logits != 0,
                                       eps, threads);
}

void spn_dyspn_step_weights_backward_f64(const double* att, const double* S, const double* A, const double* gsw,
                                         const double* gaw, const double* gscale, double* g_att, double* g_S,
                                         double* g_A, long B, long R, long HW, long att_stride, int logits, double eps,
                                         int threads) {
    dyspn_step_weights_backward<double>(att, S, A, gsw, gaw, gscale, g_att, g_S, g_A, B, R, HW, att_stride,
                                        logits != 0, eps, threads);
}

}  // extern "C"
