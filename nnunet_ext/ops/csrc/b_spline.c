/* B-spline bases on equally spaced knots, and their backward, on the CPU: compiled and loaded by
 * nnunet_ext/ops/cpu_kernel.py for nnunet_ext/ops/b_spline.py's closed form.
 *
 * Feature f's knots start at start[f] and are step[f] apart; they bound `intervals` intervals and carry
 * nb = intervals - order bases of order k = `order`. A point x sits at position p = (x - start) / step;
 * inside the knots (0 <= p < intervals) it lies in interval m = floor(p) at u = p - m, where the k + 1
 * bases m - k .. m are nonzero, with values sum_q u^q matrix[q][j] (j = 0 .. k, lowest basis first) and
 * derivatives in x of sum_q q u^(q-1) matrix[q][j] / step. Bases that do not exist (m - k + j < 0 or
 * >= nb) are skipped; every other basis is 0. A point beyond the knots has all bases 0 and gradient 0;
 * a NaN or infinite one gets NaN bases and a NaN gradient, as the recursion gives.
 *
 * Each token's bases are written once, in place: PyTorch's formulation needs index arrays (int64, larger
 * than the bases), a zero fill and a scatter, and a gather for backward.
 *
 * Layouts, float32, contiguous: x, grad_x (rows, features); bases, grad (rows, features, nb);
 * start, step (features); matrix (order + 1, order + 1). One call handles rows [r0, r1).
 * Compiled without -ffast-math: the NaN tests below must stay (-fno-trapping-math keeps them).
 */
#include <math.h>
#include <stdint.h>

static inline float horner(const float *matrix, int64_t order, int64_t j, float u)
{
    float v = matrix[order * (order + 1) + j];
    for (int64_t q = order - 1; q >= 0; q--)
        v = v * u + matrix[q * (order + 1) + j];
    return v;
}

static inline float slope(const float *matrix, int64_t order, int64_t j, float u)
{
    float v = 0.f;
    for (int64_t q = order; q >= 1; q--)
        v = v * u + (float)q * matrix[q * (order + 1) + j];
    return v;
}

/* The loops over rows, inlined once with the order as a constant (the common order 3: KAN's and U-KAN's)
 * and once for any order; gcc unrolls the polynomial loops of the constant one.
 *
 * Forward takes a row's features BLOCK at a time: first their intervals and polynomial values, in loops
 * without branches that gcc vectorises (given -fno-trapping-math), then the block's bases zeroed in one
 * sweep and each feature's k + 1 values stored at its interval's bases. Feature by feature it took 1.4
 * times as long (single thread, bases in the L2 cache). */
#define BLOCK 16

static inline __attribute__((always_inline)) void forward_rows(
    int64_t features, int64_t intervals, int64_t order, int64_t r0, int64_t r1,
    const float *x, const float *start, const float *step, const float *matrix, float *bases)
{
    const int64_t nb = intervals - order;
    int32_t first[BLOCK];  /* the index of the interval's lowest basis; nb (none exist) beyond the knots */
    float value[BLOCK * (order + 1)], position[BLOCK], u[BLOCK];
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t f0 = 0; f0 < features; f0 += BLOCK) {
            const int64_t n = features - f0 < BLOCK ? features - f0 : BLOCK;
            const float *xr = x + r * features + f0;
            for (int64_t t = 0; t < n; t++) {
                const float p = (xr[t] - start[f0 + t]) / step[f0 + t];
                const float q = p >= 0.f && p < (float)intervals ? p : -1.f;  /* -1: beyond the knots, or NaN */
                const float m = floorf(q);
                u[t] = q - m;
                first[t] = q >= 0.f ? (int32_t)m - (int32_t)order : (int32_t)nb;
                position[t] = p;
            }
            for (int64_t j = 0; j <= order; j++)
                for (int64_t t = 0; t < n; t++)
                    value[j * BLOCK + t] = horner(matrix, order, j, u[t]);
            float *out = bases + (r * features + f0) * nb;
            for (int64_t i = 0; i < n * nb; i++)
                out[i] = 0.f;
            for (int64_t t = 0; t < n; t++) {
                if (!isfinite(position[t])) {
                    for (int64_t i = 0; i < nb; i++)
                        out[t * nb + i] = NAN;
                    continue;
                }
                for (int64_t j = 0; j <= order; j++) {
                    const int64_t i = first[t] + j;
                    if (i >= 0 && i < nb)
                        out[t * nb + i] = value[j * BLOCK + t];
                }
            }
        }
    }
}

static inline __attribute__((always_inline)) void backward_rows(
    int64_t features, int64_t intervals, int64_t order, int64_t r0, int64_t r1,
    const float *x, const float *start, const float *step, const float *matrix, const float *grad, float *grad_x)
{
    const int64_t nb = intervals - order;
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t f = 0; f < features; f++) {
            const float p = (x[r * features + f] - start[f]) / step[f];
            const float *g = grad + (r * features + f) * nb;
            float sum = isfinite(p) ? 0.f : NAN;
            if (p >= 0.f && p < (float)intervals) {
                const int64_t m = (int64_t)p;
                const float u = p - (float)m;
                for (int64_t j = 0; j <= order; j++) {
                    const int64_t i = m - order + j;
                    if (i >= 0 && i < nb)
                        sum += g[i] * slope(matrix, order, j, u);
                }
            }
            grad_x[r * features + f] = sum / step[f];
        }
    }
}

void bspline_forward(int64_t features, int64_t intervals, int64_t order, int64_t r0, int64_t r1,
                     const float *x, const float *start, const float *step, const float *matrix, float *bases)
{
    if (order == 3)
        forward_rows(features, intervals, 3, r0, r1, x, start, step, matrix, bases);
    else
        forward_rows(features, intervals, order, r0, r1, x, start, step, matrix, bases);
}

void bspline_backward(int64_t features, int64_t intervals, int64_t order, int64_t r0, int64_t r1,
                      const float *x, const float *start, const float *step, const float *matrix,
                      const float *grad, float *grad_x)
{
    if (order == 3)
        backward_rows(features, intervals, 3, r0, r1, x, start, step, matrix, grad, grad_x);
    else
        backward_rows(features, intervals, order, r0, r1, x, start, step, matrix, grad, grad_x);
}
