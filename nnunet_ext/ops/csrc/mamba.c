/* The two sequence loops of a Mamba layer on the CPU, compiled and loaded by nnunet_ext/ops/cpu_kernel.py:
 * the causal depthwise convolution with its SiLU, and the selective scan with everything around it.
 *
 *   u_t = silu(conv_bias + sum_k w_k x_{t - width + 1 + k})
 *   delta_t = softplus(delta_raw_t + delta_bias)          (softplus only if s->softplus)
 *   h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t,   out_t = (C_t . h_t + D u_t) silu(z_t)
 *
 * The scan runs one loop per channel: the states of a position live in a buffer of d_state floats
 * instead of a (batch, d, length, d_state) tensor that every elementwise op would read and write
 * again, and the steps around it run in the same loop, so none of their intermediates reach memory.
 *
 * Layouts, float32. The (batch, d, L) sequences x, u, du, dx, delta, z, out, dout, ddelta, dz have
 * unit position stride and the strides of Dims, so that both a contiguous (b, d, L) tensor and
 * mamba_ssm's "d (b l)" layout (one matrix product per projection) pass without a copy.
 * A (d, n); w (d, width); conv_bias, delta_bias, D (d); B, C (batch, groups, L, n) contiguous;
 * chunk_states (batch, d, ceil(L / K), n), the state entering each chunk of K positions, which
 * backward recomputes the chunk's states from; last, dA (batch, d, n); dw (batch, d, width);
 * dconv_bias, dD, ddelta_bias (batch, d); dB, dC (batch, groups, parts, L, n): each call writes the
 * part `part` of its group, so calls that run at the same time on other channels of the group never
 * write the same floats. conv_bias, delta_bias, D and z may be NULL (absent); so may dz then.
 * One call handles channels [d0, d1) of batch row b; for the scan they all belong to one group.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int64_t batch, d, groups, n, length, chunk, parts, softplus, batch_stride, channel_stride, width;
} Dims;

static int64_t chunks_of(const Dims *s) { return (s->length + s->chunk - 1) / s->chunk; }

static int64_t offset(const Dims *s, int64_t b, int64_t c) { return b * s->batch_stride + c * s->channel_stride; }

/* Every position's loop below runs over t with fixed coefficients, so that gcc vectorises it. */

static void conv_pre_activation(const Dims *s, const float *x, const float *w, float bias, float *pre)
{
    for (int64_t t = 0; t < s->length; t++)
        pre[t] = bias;
    for (int64_t k = 0; k < s->width; k++) {
        const int64_t shift = s->width - 1 - k;  /* tap k reads x_{t - shift}; x before 0 is 0 */
        for (int64_t t = shift; t < s->length; t++)
            pre[t] += w[k] * x[t - shift];
    }
}

void conv_forward(const Dims *s, int64_t b, int64_t d0, int64_t d1,
                  const float *x, const float *w, const float *bias, float *u)
{
    float *pre = malloc(s->length * sizeof(float));
    for (int64_t c = d0; c < d1; c++) {
        const int64_t at = offset(s, b, c);
        conv_pre_activation(s, x + at, w + c * s->width, bias ? bias[c] : 0.f, pre);
        for (int64_t t = 0; t < s->length; t++)
            u[at + t] = pre[t] / (1.f + expf(-pre[t]));
    }
    free(pre);
}

void conv_backward(const Dims *s, int64_t b, int64_t d0, int64_t d1,
                   const float *x, const float *w, const float *bias, const float *du,
                   float *dx, float *dw, float *dbias)
{
    const int64_t L = s->length, W = s->width;
    float *pre = malloc(L * sizeof(float)), *g = malloc(L * sizeof(float));  /* g: dLoss / d pre */
    for (int64_t c = d0; c < d1; c++) {
        const int64_t at = offset(s, b, c), row = b * s->d + c;
        const float *xc = x + at, *duc = du + at, *wc = w + c * W;
        float *dxc = dx + at, sum = 0.f;
        conv_pre_activation(s, xc, wc, bias ? bias[c] : 0.f, pre);
        for (int64_t t = 0; t < L; t++) {
            const float sg = 1.f / (1.f + expf(-pre[t]));
            g[t] = duc[t] * sg * (1.f + pre[t] * (1.f - sg));
            sum += g[t];
        }
        dbias[row] = sum;
        for (int64_t t = 0; t < L; t++)
            dxc[t] = 0.f;
        for (int64_t k = 0; k < W; k++) {
            const int64_t shift = W - 1 - k;
            float acc = 0.f;
            for (int64_t t = shift; t < L; t++)
                acc += g[t] * xc[t - shift];
            dw[row * W + k] = acc;
            for (int64_t t = 0; t + shift < L; t++)
                dxc[t] += wc[k] * g[t + shift];
        }
    }
    free(pre); free(g);
}

/* The per-position work of the scan for positions [t0, t0 + len): delta_t = softplus(delta_raw_t + bias),
 * or without softplus the sum; sig_z_t = sigmoid(z_t); sig_raw_t = softplus'(delta_raw_t + bias).
 * Run one position at a time inside the scan, these exponentials and logarithms would cost more than
 * the whole d_state loop. PyTorch's softplus is linear above 20, where log1p(exp(x)) equals x in
 * float32 anyway. z, sig_z and sig_raw may be NULL. */
static void per_position(const Dims *s, const float *raw, float bias, const float *z, int64_t len,
                         float *steps, float *sig_z, float *sig_raw)
{
    if (s->softplus)
        for (int64_t j = 0; j < len; j++) {
            const float x = raw[j] + bias;
            steps[j] = x > 20.f ? x : log1pf(expf(x));
        }
    else
        for (int64_t j = 0; j < len; j++)
            steps[j] = raw[j] + bias;
    if (z)
        for (int64_t j = 0; j < len; j++)
            sig_z[j] = 1.f / (1.f + expf(-z[j]));
    if (sig_raw)
        for (int64_t j = 0; j < len; j++) {
            const float x = raw[j] + bias;
            sig_raw[j] = !s->softplus || x > 20.f ? 1.f : 1.f / (1.f + expf(-x));
        }
}

static inline __attribute__((always_inline)) void
scan_forward_n(const int64_t n, const Dims *s, int64_t b, int64_t d0, int64_t d1,
               const float *u, const float *delta, const float *delta_bias, const float *A,
               const float *B, const float *C, const float *D, const float *z,
               float *out, float *chunk_states, float *last)
{
    const int64_t L = s->length, K = s->chunk, group = d0 / (s->d / s->groups);
    const float *Bg = B + (b * s->groups + group) * L * n, *Cg = C + (b * s->groups + group) * L * n;
    float h[n];  /* of constant size for d_state 16, like g and dAc below */
    float *steps = malloc(K * sizeof(float)), *sig_z = malloc(K * sizeof(float));
    for (int64_t c = d0; c < d1; c++) {
        const int64_t at = offset(s, b, c), row = b * s->d + c;
        const float *uc = u + at, *dc = delta + at, *zc = z ? z + at : NULL, *Ac = A + c * n;
        const float bias = delta_bias ? delta_bias[c] : 0.f, skip = D ? D[c] : 0.f;
        float *oc = out + at, *states = chunk_states + row * chunks_of(s) * n;
        memset(h, 0, n * sizeof(float));
        for (int64_t t0 = 0; t0 < L; t0 += K) {
            const int64_t len = (L - t0 < K) ? L - t0 : K;
            memcpy(states + (t0 / K) * n, h, n * sizeof(float));
            per_position(s, dc + t0, bias, zc ? zc + t0 : NULL, len, steps, sig_z, NULL);
            for (int64_t j = 0; j < len; j++) {
                const int64_t t = t0 + j;
                const float dt = steps[j], x = dt * uc[t], *Bt = Bg + t * n, *Ct = Cg + t * n;
                float acc = 0.f;
                for (int64_t i = 0; i < n; i++) {
                    h[i] = expf(dt * Ac[i]) * h[i] + x * Bt[i];
                    acc += Ct[i] * h[i];
                }
                const float y = acc + skip * uc[t];
                oc[t] = zc ? y * zc[t] * sig_z[j] : y;
            }
        }
        memcpy(last + row * n, h, n * sizeof(float));
    }
    free(steps); free(sig_z);
}

/* d_state 16, Mamba's default, gets a copy of the loops compiled for that constant (backward about 1.3x faster). */
void scan_forward(const Dims *s, int64_t b, int64_t d0, int64_t d1,
                  const float *u, const float *delta, const float *delta_bias, const float *A,
                  const float *B, const float *C, const float *D, const float *z,
                  float *out, float *chunk_states, float *last)
{
    if (s->n == 16)
        scan_forward_n(16, s, b, d0, d1, u, delta, delta_bias, A, B, C, D, z, out, chunk_states, last);
    else
        scan_forward_n(s->n, s, b, d0, d1, u, delta, delta_bias, A, B, C, D, z, out, chunk_states, last);
}

/* g_t = dLoss/dh_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}, run from the last position back, chunk by
 * chunk, where dy_t is the gradient reaching C_t . h_t through the gate; grad_last (batch, d, n) may
 * be NULL. */
static inline __attribute__((always_inline)) void
scan_backward_n(const int64_t n, const Dims *s, int64_t b, int64_t d0, int64_t d1, int64_t part,
                const float *u, const float *delta, const float *delta_bias, const float *A,
                const float *B, const float *C, const float *D, const float *z,
                const float *chunk_states, const float *dout, const float *grad_last,
                float *du, float *ddelta, float *dA, float *dB, float *dC, float *dD, float *ddelta_bias,
                float *dz)
{
    const int64_t L = s->length, K = s->chunk, group = d0 / (s->d / s->groups);
    const int64_t bg = b * s->groups + group;
    const float *Bg = B + bg * L * n, *Cg = C + bg * L * n;
    float *dBg = dB + (bg * s->parts + part) * L * n, *dCg = dC + (bg * s->parts + part) * L * n;
    float g[n], dAc[n];
    float *hs = malloc((K + 1) * n * sizeof(float));  /* h_{t0 - 1} .. h_{t0 + K - 1} */
    float *decay = malloc(K * n * sizeof(float));     /* exp(delta_t A) for t in the chunk */
    float *steps = malloc(K * sizeof(float)), *sig_z = malloc(K * sizeof(float));
    float *sig_raw = malloc(K * sizeof(float)), *ys = malloc(K * sizeof(float));  /* ys: C_t . h_t */
    for (int64_t c = d0; c < d1; c++) {
        const int64_t at = offset(s, b, c), row = b * s->d + c;
        const float *uc = u + at, *dc = delta + at, *zc = z ? z + at : NULL, *dyc = dout + at, *Ac = A + c * n;
        const float bias = delta_bias ? delta_bias[c] : 0.f, skip = D ? D[c] : 0.f;
        float *duc = du + at, *ddc = ddelta + at, *dzc = z ? dz + at : NULL;
        float dDc = 0.f, dbias = 0.f;
        if (grad_last)
            memcpy(g, grad_last + row * n, n * sizeof(float));
        else
            memset(g, 0, n * sizeof(float));
        memset(dAc, 0, n * sizeof(float));
        for (int64_t k = chunks_of(s) - 1; k >= 0; k--) {
            const int64_t t0 = k * K, len = (L - t0 < K) ? L - t0 : K;
            memcpy(hs, chunk_states + (row * chunks_of(s) + k) * n, n * sizeof(float));
            per_position(s, dc + t0, bias, zc ? zc + t0 : NULL, len, steps, sig_z, sig_raw);
            for (int64_t j = 0; j < len; j++) {
                const float dt = steps[j], x = dt * uc[t0 + j];
                const float *Bt = Bg + (t0 + j) * n, *Ct = Cg + (t0 + j) * n;
                float acc = 0.f;
                for (int64_t i = 0; i < n; i++) {
                    decay[j * n + i] = expf(dt * Ac[i]);
                    hs[(j + 1) * n + i] = decay[j * n + i] * hs[j * n + i] + x * Bt[i];
                    acc += Ct[i] * hs[(j + 1) * n + i];
                }
                ys[j] = acc;
            }
            for (int64_t j = len - 1; j >= 0; j--) {
                const int64_t t = t0 + j;
                const float dt = steps[j], ut = uc[t], *Bt = Bg + t * n, *Ct = Cg + t * n;
                const float *h_prev = hs + j * n, *h_t = hs + (j + 1) * n, *a = decay + j * n;
                float *dBt = dBg + t * n, *dCt = dCg + t * n;
                float gy = dyc[t];  /* becomes the gradient of C_t . h_t + D u_t */
                if (zc) {
                    const float zt = zc[t], sz = sig_z[j];
                    dzc[t] = gy * (ys[j] + skip * ut) * sz * (1.f + zt * (1.f - sz));
                    gy *= zt * sz;
                }
                float g_input = 0.f, g_delta_a = 0.f;
                for (int64_t i = 0; i < n; i++) {
                    const float gi = g[i] + Ct[i] * gy;
                    const float g_log_decay = gi * a[i] * h_prev[i];  /* dLoss / d(delta_t A_i) */
                    dCt[i] += gy * h_t[i];
                    dBt[i] += gi * dt * ut;
                    g_input += gi * Bt[i];
                    g_delta_a += g_log_decay * Ac[i];
                    dAc[i] += g_log_decay * dt;
                    g[i] = gi * a[i];  /* carried to t - 1 */
                }
                duc[t] = dt * g_input + skip * gy;
                dDc += gy * ut;
                ddc[t] = (ut * g_input + g_delta_a) * sig_raw[j];
                dbias += ddc[t];
            }
        }
        memcpy(dA + row * n, dAc, n * sizeof(float));
        dD[row] = dDc;
        ddelta_bias[row] = dbias;
    }
    free(hs); free(decay); free(steps); free(sig_z); free(sig_raw); free(ys);
}

void scan_backward(const Dims *s, int64_t b, int64_t d0, int64_t d1, int64_t part,
                   const float *u, const float *delta, const float *delta_bias, const float *A,
                   const float *B, const float *C, const float *D, const float *z,
                   const float *chunk_states, const float *dout, const float *grad_last,
                   float *du, float *ddelta, float *dA, float *dB, float *dC, float *dD, float *ddelta_bias,
                   float *dz)
{
    if (s->n == 16)
        scan_backward_n(16, s, b, d0, d1, part, u, delta, delta_bias, A, B, C, D, z, chunk_states, dout,
                        grad_last, du, ddelta, dA, dB, dC, dD, ddelta_bias, dz);
    else
        scan_backward_n(s->n, s, b, d0, d1, part, u, delta, delta_bias, A, B, C, D, z, chunk_states, dout,
                        grad_last, du, ddelta, dA, dB, dC, dD, ddelta_bias, dz);
}
