/* fxquant's fused CPU fake-quantization passes (float32), the CPU kernel of the op fxquant::fake_quantize
 * (native/fake_quant_op.cpp calls them; fxquant/quant/native_build.py compiles both on first use).
 *
 * Why C and not torch ops: the elementwise formulation (fxquant/quant/reference.py) makes several passes over an
 * activation forward and more backward; here the forward is one read and one write, and the backward two reads
 * and one write with LSQ's step-gradient sums accumulated in the same loop (the quantized value is recomputed
 * from x instead of being read back).
 *
 * Numerics are those of reference.py, bit for bit in the values and the input gradient: v = xc * inv in float32
 * (built with -ffp-contract=off, so never fused into an FMA), clamped to [low, high], rounded half to even, times
 * s; the backward passes grad where below < v < above (open bounds that reproduce the rounding's ties, see
 * exclusive_bounds) and zeroes it elsewhere: a NaN v gets no gradient, and a NaN gradient outside the range is
 * zeroed, not propagated. Clamping before rounding equals rounding before clamping because the bounds are
 * integers. NaN inputs stay NaN. The step gradient is summed in the residual form Σ grad·level − grad_q·v (level
 * the rounded, clamped value), whose terms are small where the two products nearly cancel; sums are accumulated
 * in float vectors over short blocks and in double across blocks.
 *
 * Offsets: each row has a zero point z (one shared, one per row, or none), rounded half to even and clamped into
 * [qmin, qmax]; clamp(round(v) + z, qmin, qmax) − z = clamp(round(v), qmin − z, qmax − z), so the row's range is
 * shifted instead of each element. A NaN offset makes its row NaN (forward), with no input gradient, as the
 * reference's arithmetic does.
 *
 * Fused input clamp: a ReLU, ReLU6 or Hardtanh whose only reader is the quantizer is folded into it (passes/
 * fuse_activations.py), and the kernel applies it first: xc = clamp(x, in_low, in_high) (NaN stays NaN), then the
 * quantization of xc; the backward also zeroes the gradient outside the open interval (in_low, in_high), as
 * torch's hardtanh_backward does, and takes the step sums over xc. Without one, the bounds are -inf and +inf and the
 * loops compiled for that case skip the clamp.
 *
 * Layout: `rows` rows of `inner` contiguous elements, one step per row (per tensor: one row). Threads: the caller
 * passes torch's thread count; rows (or, for one row, ranges of it) are split into that many parts run by OpenMP.
 * Built with -fopenmp, this file needs libgomp.so.1, and inside a process that imported torch's pip wheel the
 * dynamic loader resolves that to the libgomp torch already loaded: one thread pool, the one torch's own ops run
 * on. (Short-lived pthreads were tried first: creating them cost more per call than small passes take, and they
 * fought the pool's spinning workers for the cores.) Built without OpenMP, everything runs on the calling thread. Small tensors run
 * on one thread either way.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Explicit vectors (GCC/Clang vector extensions): GCC's auto-vectoriser leaves the backward loop scalar with
 * branches, several times slower. Eight lanes where AVX exists, else four (SSE2, NEON). */
#if defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif
typedef float vfloat __attribute__((vector_size(LANES * 4)));
typedef int32_t vmask __attribute__((vector_size(LANES * 4)));

#define MAGIC 12582912.0f     /* 1.5 * 2^23: (v + MAGIC) - MAGIC rounds |v| < 2^22 half to even */
#define BLOCK 2048            /* elements summed in float vectors before joining the double sums */
#define MIN_PER_THREAD 32768  /* elements; below this a thread costs more than it saves */
#define MAX_THREADS 64

static inline vfloat splat(float a) {
    vfloat v;
    for (int l = 0; l < LANES; ++l) v[l] = a;
    return v;
}
static inline vfloat load(const float *p) { vfloat v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vfloat v) { memcpy(p, &v, sizeof v); }
static inline vfloat pick(vmask m, vfloat a, vfloat b) { return (vfloat)((m & (vmask)a) | (~m & (vmask)b)); }
static inline double lane_sum(vfloat v) {
    double s = 0.0;
    for (int l = 0; l < LANES; ++l) s += v[l];
    return s;
}
static inline float clamp1(float v, float low, float high) {
    v = v < low ? low : v; /* a NaN fails both tests and stays NaN */
    return v > high ? high : v;
}
static inline float round1(float v) { return (v + MAGIC) - MAGIC; } /* |v| < 2^22, half to even */

typedef struct {
    float inv, s, low, high, below, above;
    float in_low, in_high; /* the fused input clamp, or -inf and +inf */
    int nan_row;           /* the row's offset is NaN */
} Grid;

static inline vfloat clamp_v(vfloat v, vfloat low, vfloat high) {
    v = pick(v < low, low, v); /* a NaN fails both tests and stays NaN */
    return pick(v > high, high, v);
}

/* Open bounds (below, above) on v such that below < v < above exactly when round(v) lies in [low, high] under
 * round-half-to-even: at a tie v = high + 1/2 rounds down (inside) when high is even, so the bound moves one float
 * above the tie; the same below. */
static float below_of(float low) {
    const float b = low - 0.5f;
    return fmodf(low, 2.0f) == 0.0f ? nextafterf(b, -INFINITY) : b;
}
static float above_of(float high) {
    const float a = high + 0.5f;
    return fmodf(high, 2.0f) == 0.0f ? nextafterf(a, INFINITY) : a;
}

/* forward of one row: out = round(clamp(xc * inv)) * s with xc = clamp(x, in_low, in_high). `clamped` is a
 * compile-time constant at each call site, so the loop without an input clamp does no extra work. */
static inline void forward_row_impl(const float *restrict x, float *restrict out, int64_t n, Grid g,
                                    const int clamped) {
    const vfloat inv = splat(g.inv), s = splat(g.s), low = splat(g.low), high = splat(g.high), magic = splat(MAGIC);
    const vfloat in_low = splat(g.in_low), in_high = splat(g.in_high);
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        vfloat xv = load(x + i);
        if (clamped) xv = clamp_v(xv, in_low, in_high);
        const vfloat v = clamp_v(xv * inv, low, high);
        store(out + i, ((v + magic) - magic) * s);
    }
    for (; i < n; ++i) {
        const float xc = clamped ? clamp1(x[i], g.in_low, g.in_high) : x[i];
        out[i] = round1(clamp1(xc * g.inv, g.low, g.high)) * g.s;
    }
}

static void forward_row(const float *restrict x, float *restrict out, int64_t n, Grid g) {
    if (g.nan_row) {
        for (int64_t i = 0; i < n; ++i) out[i] = NAN;
    } else if (g.in_low == -INFINITY && g.in_high == INFINITY) {
        forward_row_impl(x, out, n, g, 0);
    } else {
        forward_row_impl(x, out, n, g, 1);
    }
}

/* backward of one row: grad_x (unless NULL), and sums[0] += Σ (grad·level − grad_q·v), sums[1] += Σ (grad − grad_q),
 * where grad_q is the quantizer's own straight-through gradient (before the input clamp's mask), v = xc·inv and
 * level = round(clamp(v)): the step and offset gradients of the quantizer that reads xc. */
static inline void backward_row_impl(const float *restrict grad, const float *restrict x, float *restrict grad_x,
                                     int64_t n, Grid g, double *sums, const int clamped, const int store_x) {
    const vfloat inv = splat(g.inv), low = splat(g.low), high = splat(g.high), magic = splat(MAGIC);
    const vfloat below = splat(g.below), above = splat(g.above), zero = splat(0.0f);
    const vfloat in_low = splat(g.in_low), in_high = splat(g.in_high);
    double residual = 0.0, outside = 0.0;
    int64_t i = 0;
    while (i + LANES <= n) {
        const int64_t stop = i + BLOCK < n ? i + BLOCK : n;
        vfloat acc_residual = zero, acc_outside = zero;
        for (; i + LANES <= stop; i += LANES) {
            const vfloat xv = load(x + i), gv = load(grad + i);
            const vfloat xc = clamped ? clamp_v(xv, in_low, in_high) : xv;
            const vfloat v = xc * inv;
            const vfloat level = (clamp_v(v, low, high) + magic) - magic;
            const vfloat gq = pick((v > below) & (v < above), gv, zero);
            if (store_x) store(grad_x + i, clamped ? pick((xv > in_low) & (xv < in_high), gq, zero) : gq);
            acc_residual += gv * level - gq * v;
            acc_outside += gv - gq;
        }
        residual += lane_sum(acc_residual);
        outside += lane_sum(acc_outside);
    }
    for (; i < n; ++i) {
        const float xc = clamped ? clamp1(x[i], g.in_low, g.in_high) : x[i];
        const float v = xc * g.inv;
        const float level = round1(clamp1(v, g.low, g.high));
        const float gq = (v > g.below && v < g.above) ? grad[i] : 0.0f;
        if (store_x) grad_x[i] = (!clamped || (x[i] > g.in_low && x[i] < g.in_high)) ? gq : 0.0f;
        residual += grad[i] * level - gq * v;
        outside += grad[i] - gq;
    }
    sums[0] += residual;
    sums[1] += outside;
}

static void backward_row(const float *restrict grad, const float *restrict x, float *restrict grad_x, int64_t n,
                         Grid g, double *sums) {
    const int clamped = !(g.in_low == -INFINITY && g.in_high == INFINITY);
    if (g.nan_row) { /* every level is NaN: no input gradient, a NaN step gradient, every element "outside" */
        double total = 0.0;
        for (int64_t i = 0; i < n; ++i) {
            if (grad_x) grad_x[i] = 0.0f;
            total += grad[i];
        }
        sums[0] += NAN;
        sums[1] += total;
    } else if (grad_x) {
        if (clamped) backward_row_impl(grad, x, grad_x, n, g, sums, 1, 1);
        else backward_row_impl(grad, x, grad_x, n, g, sums, 0, 1);
    } else {
        if (clamped) backward_row_impl(grad, x, grad_x, n, g, sums, 1, 0);
        else backward_row_impl(grad, x, grad_x, n, g, sums, 0, 0);
    }
}

typedef struct {
    const float *x, *grad;
    float *out;
    const float *scale;  /* steps, applied as max(step, min_step); row r reads scale[r * scale_stride] */
    const float *offset; /* zero points or NULL; row r reads offset[r * offset_stride] */
    int64_t scale_stride, offset_stride;
    float min_step, qmin, qmax, in_low, in_high;
    int64_t inner;
    /* rows [row_begin, row_end), or, with one row, elements [begin, end) of it */
    int64_t row_begin, row_end, begin, end;
    double *sums;    /* 2 per row (backward only) */
    double part[2];  /* this part's sums when a single row is split */
    int backward;
} Part;

/* the step applied (NaN stays NaN, as with torch's clamp) */
static float applied_step(const Part *p, int64_t row) {
    const float step = p->scale[row * p->scale_stride];
    return step < p->min_step ? p->min_step : step;
}

/* the offset applied: rounded half to even and clamped into [qmin, qmax] (NaN stays NaN) */
static float applied_offset(const Part *p, int64_t row) {
    if (!p->offset) return 0.0f;
    return round1(clamp1(p->offset[row * p->offset_stride], p->qmin, p->qmax));
}

static Grid grid_of(const Part *p, int64_t row) {
    const float s = applied_step(p, row), z = applied_offset(p, row);
    const float low = p->qmin - z, high = p->qmax - z;
    Grid g = {1.0f / s, s, low, high, below_of(low), above_of(high), p->in_low, p->in_high, isnan(z) != 0};
    return g;
}

static void run_part(Part *p) {
    float *grad_x = p->backward ? p->out : NULL;
    if (p->row_end - p->row_begin == 1 && (p->begin != 0 || p->end != p->inner)) {
        const int64_t off = p->row_begin * p->inner + p->begin, n = p->end - p->begin;
        const Grid g = grid_of(p, p->row_begin);
        if (p->backward) backward_row(p->grad + off, p->x + off, grad_x ? grad_x + off : NULL, n, g, p->part);
        else forward_row(p->x + off, p->out + off, n, g);
        return;
    }
    for (int64_t row = p->row_begin; row < p->row_end; ++row) {
        const int64_t off = row * p->inner;
        const Grid g = grid_of(p, row);
        if (p->backward)
            backward_row(p->grad + off, p->x + off, grad_x ? grad_x + off : NULL, p->inner, g, p->sums + 2 * row);
        else forward_row(p->x + off, p->out + off, p->inner, g);
    }
}

static void run(Part *proto, int64_t rows, int threads) {
    const int64_t total = rows * proto->inner;
    int64_t most = total / MIN_PER_THREAD;
    int t = threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads);
    if (most < 1) most = 1;
    if (t > most) t = (int)most;
    const int split_row = rows == 1;
    if (!split_row && t > rows) t = (int)rows;
    Part parts[MAX_THREADS];
    for (int k = 0; k < t; ++k) {
        parts[k] = *proto;
        parts[k].part[0] = parts[k].part[1] = 0.0;
        if (split_row) {
            parts[k].row_begin = 0;
            parts[k].row_end = 1;
            parts[k].begin = proto->inner * k / t;
            parts[k].end = proto->inner * (k + 1) / t;
        } else {
            parts[k].row_begin = rows * k / t;
            parts[k].row_end = rows * (k + 1) / t;
            parts[k].begin = 0;
            parts[k].end = proto->inner;
        }
    }
#ifdef _OPENMP
#pragma omp parallel for num_threads(t) schedule(static, 1) if (t > 1)
#endif
    for (int k = 0; k < t; ++k) run_part(&parts[k]);
    if (split_row && proto->backward) {
        /* parts joined in a fixed order: the same sums for the same thread count */
        for (int k = 0; k < t; ++k)
            for (int j = 0; j < 2; ++j) proto->sums[j] += parts[k].part[j];
    }
}

static Part part_of(const float *x, int64_t inner, const float *scale, int64_t scale_stride, const float *offset,
                    int64_t offset_stride, float min_step, float qmin, float qmax, float in_low, float in_high) {
    Part p;
    memset(&p, 0, sizeof p);
    p.x = x; p.inner = inner; p.scale = scale; p.scale_stride = scale_stride; p.offset = offset;
    p.offset_stride = offset_stride; p.min_step = min_step; p.qmin = qmin; p.qmax = qmax; p.in_low = in_low;
    p.in_high = in_high;
    return p;
}

/* out = fake_quantize(clamp(x, in_low, in_high)), one step (and offset) per row of `inner` elements. */
void fxq_forward(const float *x, float *out, int64_t rows, int64_t inner, const float *scale, int64_t scale_stride,
                 const float *offset, int64_t offset_stride, float min_step, float qmin, float qmax, float in_low,
                 float in_high, int threads) {
    Part p = part_of(x, inner, scale, scale_stride, offset, offset_stride, min_step, qmin, qmax, in_low, in_high);
    p.out = out;
    run(&p, rows, threads);
}

/* grad_x, and per row (each output pointer may be NULL when that gradient is not wanted)
 *   grad_scale[r]  = grad_factor · Σ (grad·level − grad_q·v)   (LSQ: Σ grad·((c − z) − m·xc/s))
 *   grad_offset[r] = −grad_factor · s · Σ (grad − grad_q)      (LSQ+: the clipped elements' share)
 * Returns 0, or −1 when the row sums cannot be allocated (nothing written then). */
int fxq_backward(const float *grad, const float *x, float *grad_x, int64_t rows, int64_t inner, const float *scale,
                 int64_t scale_stride, const float *offset, int64_t offset_stride, float min_step, float qmin,
                 float qmax, float in_low, float in_high, float grad_factor, float *grad_scale, float *grad_offset,
                 int threads) {
    double *sums = calloc((size_t)(2 * rows), sizeof(double));
    if (!sums) return -1;
    Part p = part_of(x, inner, scale, scale_stride, offset, offset_stride, min_step, qmin, qmax, in_low, in_high);
    p.grad = grad; p.out = grad_x; p.sums = sums; p.backward = 1;
    run(&p, rows, threads);
    for (int64_t r = 0; r < rows; ++r) {
        if (grad_scale) grad_scale[r] = (float)sums[2 * r] * grad_factor;
        if (grad_offset) grad_offset[r] = -(float)sums[2 * r + 1] * applied_step(&p, r) * grad_factor;
    }
    free(sums);
    return 0;
}
