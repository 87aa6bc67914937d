/* Mamba's selective scan on the CPU, one fused loop per channel: the states of a position live in a
 * buffer of d_state floats instead of a (batch, d, length, d_state) tensor that every elementwise op
 * would read and write again. Compiled and loaded by nnunet_ext/ops/cpu_kernel.py.
 *
 *   h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t,   y_t = C_t . h_t      (per batch row and channel)
 *
 * Layouts, float32, contiguous: u, delta, y, du, ddelta (batch, d, L); A (d, n);
 * B, C (batch, groups, L, n); chunk_states (batch, d, ceil(L / K), n), the state entering each chunk
 * of K positions, which backward recomputes the chunk's states from; last, dA (batch, d, n);
 * dB, dC (batch, groups, parts, L, n): each call writes the part `part` of its group, so calls that
 * run at the same time on other channels of the group never write the same floats.
 * One call handles channels [d0, d1) of batch row b; they all belong to one group.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int64_t batch, d, groups, n, length, chunk, parts;
} Dims;

static int64_t chunks_of(const Dims *s) { return (s->length + s->chunk - 1) / s->chunk; }

void scan_forward(const Dims *s, int64_t b, int64_t d0, int64_t d1,
                  const float *u, const float *delta, const float *A, const float *B, const float *C,
                  float *y, float *chunk_states, float *last)
{
    const int64_t n = s->n, L = s->length, group = d0 / (s->d / s->groups);
    const float *Bg = B + (b * s->groups + group) * L * n, *Cg = C + (b * s->groups + group) * L * n;
    float *h = malloc(n * sizeof(float));
    for (int64_t c = d0; c < d1; c++) {
        const int64_t row = b * s->d + c;
        const float *uc = u + row * L, *dc = delta + row * L, *Ac = A + c * n;
        float *yc = y + row * L, *states = chunk_states + row * chunks_of(s) * n;
        memset(h, 0, n * sizeof(float));
        for (int64_t t = 0; t < L; t++) {
            if (t % s->chunk == 0)
                memcpy(states + (t / s->chunk) * n, h, n * sizeof(float));
            const float dt = dc[t], x = dt * uc[t], *Bt = Bg + t * n, *Ct = Cg + t * n;
            float acc = 0.f;
            for (int64_t i = 0; i < n; i++) {
                h[i] = expf(dt * Ac[i]) * h[i] + x * Bt[i];
                acc += Ct[i] * h[i];
            }
            yc[t] = acc;
        }
        memcpy(last + row * n, h, n * sizeof(float));
    }
    free(h);
}

/* g_t = dLoss/dh_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}, run from the last position back, chunk by
 * chunk; grad_last (batch, d, n) may be NULL. */
void scan_backward(const Dims *s, int64_t b, int64_t d0, int64_t d1, int64_t part,
                   const float *u, const float *delta, const float *A, const float *B, const float *C,
                   const float *chunk_states, const float *dy, const float *grad_last,
                   float *du, float *ddelta, float *dA, float *dB, float *dC)
{
    const int64_t n = s->n, L = s->length, K = s->chunk, group = d0 / (s->d / s->groups);
    const int64_t bg = b * s->groups + group;
    const float *Bg = B + bg * L * n, *Cg = C + bg * L * n;
    float *dBg = dB + (bg * s->parts + part) * L * n, *dCg = dC + (bg * s->parts + part) * L * n;
    float *g = malloc(n * sizeof(float)), *dAc = malloc(n * sizeof(float));
    float *hs = malloc((K + 1) * n * sizeof(float));  /* h_{t0 - 1} .. h_{t0 + K - 1} */
    float *decay = malloc(K * n * sizeof(float));     /* exp(delta_t A) for t in the chunk */
    for (int64_t c = d0; c < d1; c++) {
        const int64_t row = b * s->d + c;
        const float *uc = u + row * L, *dc = delta + row * L, *dyc = dy + row * L, *Ac = A + c * n;
        float *duc = du + row * L, *ddc = ddelta + row * L;
        if (grad_last)
            memcpy(g, grad_last + row * n, n * sizeof(float));
        else
            memset(g, 0, n * sizeof(float));
        memset(dAc, 0, n * sizeof(float));
        for (int64_t k = chunks_of(s) - 1; k >= 0; k--) {
            const int64_t t0 = k * K, len = (L - t0 < K) ? L - t0 : K;
            memcpy(hs, chunk_states + (row * chunks_of(s) + k) * n, n * sizeof(float));
            for (int64_t j = 0; j < len; j++) {
                const float dt = dc[t0 + j], x = dt * uc[t0 + j], *Bt = Bg + (t0 + j) * n;
                for (int64_t i = 0; i < n; i++) {
                    decay[j * n + i] = expf(dt * Ac[i]);
                    hs[(j + 1) * n + i] = decay[j * n + i] * hs[j * n + i] + x * Bt[i];
                }
            }
            for (int64_t j = len - 1; j >= 0; j--) {
                const int64_t t = t0 + j;
                const float dt = dc[t], ut = uc[t], gy = dyc[t], *Bt = Bg + t * n, *Ct = Cg + t * n;
                const float *h_prev = hs + j * n, *h_t = hs + (j + 1) * n, *a = decay + j * n;
                float *dBt = dBg + t * n, *dCt = dCg + t * n;
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
                duc[t] = dt * g_input;
                ddc[t] = ut * g_input + g_delta_a;
            }
        }
        memcpy(dA + row * n, dAc, n * sizeof(float));
    }
    free(g); free(dAc); free(hs); free(decay);
}
