/* The weight gradient of a depthwise convolution on channels-last maps, on the CPU: compiled and loaded by
 * nnunet_ext/ops/cpu_kernel.py for nnunet_ext/ops/channels_last.py.
 *
 * For channel c and tap t = (a, b, e): grad_weight[t][c] = sum over n and output positions (i, j, l) of
 * x[n][i sd - pd + a dd][j sh - ph + b dh][l sw - pw + e dw][c] * grad[n][i][j][l][c], taps that fall in the
 * padding adding 0 (s: stride, p: padding, d: dilation). A transposed convolution's weight gradient is the same
 * sum with the roles swapped: its output gradient as x, its input as grad. oneDNN computes this some ten times
 * slower than the convolution itself; here each output row (n, i, j) is read once per tap while it is in cache,
 * channels innermost, so the sums over a row stay in registers and vectorise over the channels.
 *
 * Layouts, float32: x (N, D, H, W, C) and grad (N, Do, Ho, Wo, C), each contiguous (a channels-last map's
 * memory). One call sums rows r = (n Do + i) Ho + j in
 * [r0, r1) into out (taps, C), which it zeroes first; the caller adds the calls' partial sums.
 */
#include <stdint.h>
#include <string.h>

#define BLOCK 16 /* channels whose sums one pass keeps in registers */

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* out[c] += sum over l of x[l step + c] grad[l C + c] for c < count (count <= BLOCK), l < length */
static inline __attribute__((always_inline)) void row_sum(const float *x, int64_t step, const float *grad,
                                                          int64_t length, int64_t C, int64_t count, float *out)
{
    float sum[BLOCK] = {0};
    for (int64_t l = 0; l < length; l++)
        for (int64_t c = 0; c < count; c++)
            sum[c] += x[l * step + c] * grad[l * C + c];
    for (int64_t c = 0; c < count; c++)
        out[c] += sum[c];
}

void depthwise_grad_weight(const int64_t *shape, int64_t r0, int64_t r1, const float *x, const float *grad,
                           float *out)
{
    /* shape: C, D, H, W, Do, Ho, Wo, then kernel, stride, padding and dilation per axis (d, h, w) */
    const int64_t C = shape[0], D = shape[1], H = shape[2], W = shape[3], Do = shape[4], Ho = shape[5],
                  Wo = shape[6];
    const int64_t *k = shape + 7, *stride = shape + 10, *pad = shape + 13, *dil = shape + 16;
    memset(out, 0, sizeof(float) * k[0] * k[1] * k[2] * C);
    for (int64_t r = r0; r < r1; r++) {
        const int64_t n = r / (Do * Ho), i = (r / Ho) % Do, j = r % Ho;
        const float *g = grad + r * Wo * C;
        for (int64_t a = 0; a < k[0]; a++) {
            const int64_t xi = i * stride[0] - pad[0] + a * dil[0];
            if (xi < 0 || xi >= D)
                continue;
            for (int64_t b = 0; b < k[1]; b++) {
                const int64_t xj = j * stride[1] - pad[1] + b * dil[1];
                if (xj < 0 || xj >= H)
                    continue;
                const float *xrow = x + ((n * D + xi) * H + xj) * W * C;
                for (int64_t e = 0; e < k[2]; e++) {
                    /* output positions l whose input l sw + shift lies inside the row */
                    const int64_t shift = e * dil[2] - pad[2], sw = stride[2];
                    const int64_t l0 = shift >= 0 ? 0 : (sw - 1 - shift) / sw;
                    const int64_t l1 = shift >= W ? 0 : min64(Wo, (W - 1 - shift) / sw + 1);
                    if (l1 <= l0)
                        continue;
                    float *o = out + ((a * k[1] + b) * k[2] + e) * C;
                    const float *xl = xrow + (l0 * sw + shift) * C, *gl = g + l0 * C;
                    int64_t c = 0;
                    for (; c + BLOCK <= C; c += BLOCK)
                        row_sum(xl + c, sw * C, gl + c, l1 - l0, C, BLOCK, o + c);
                    if (c < C)
                        row_sum(xl + c, sw * C, gl + c, l1 - l0, C, C - c, o + c);
                }
            }
        }
    }
}
