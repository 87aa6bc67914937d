/* Trilinear sampling of channels-last 3D maps at fractional positions, weighed per tap and channel and summed over
 * taps, on the CPU: a depthwise deformable convolution, or with one tap of weight 1 the samples themselves (the
 * sampling of a deformable 3D convolution), for nnunet_ext/ops/deform_conv.py; compiled and loaded by
 * nnunet_ext/ops/cpu_kernel.py.
 *
 * The value at position (z, y, x), in input pixels, is the sum over the 8 surrounding voxels of voxel value times
 * (1 - |z - voxel z|)(1 - |y - voxel y|)(1 - |x - voxel x|), voxels outside the map reading 0: grid_sample's
 * trilinear mode with zero padding. PyTorch's CPU grid_sample in 3D visits the channels of a voxel at a stride
 * of the whole map and parallelises over the batch alone; here the channels of a voxel are adjacent
 * (channels-last), so a sample is a weighted sum of up to 8 rows of C floats, vectorised over the channels.
 *
 * Layouts, float32, contiguous: x (M, D, H, W, C); position (M, P, T, 3) as (z, y, x); weight (T, C); out
 * (M, P, C), row r = m P + p being the sum over taps t of weight[t][c] times the sample of channel c at
 * position[r][t]. No sample is stored. shape: M, D, H, W, C, P, T. Forward and the position and weight gradients
 * work on rows [r0, r1); the input gradient on channels [c0, c1) of every row, so that calls never add to the
 * same floats.
 */
#include <math.h>
#include <stdint.h>

/* The voxels around position p that lie inside map m: how many (0 to 8), each one's first float in x and its
 * weight factor along each axis, then, in `upper`, which of the two voxels per axis it is (bit 2: z, 1: y, 0: x). */
static inline int corners(const int64_t *shape, int64_t m, const float *p, int64_t offset[8], float f[8][3],
                          int upper[8])
{
    const int64_t D = shape[1], H = shape[2], W = shape[3], C = shape[4];
    if (!(p[0] > -1.f && p[0] < (float)D && p[1] > -1.f && p[1] < (float)H && p[2] > -1.f && p[2] < (float)W))
        return 0; /* no voxel within reach (NaN included) */
    const float lz = floorf(p[0]), ly = floorf(p[1]), lx = floorf(p[2]);
    const int64_t z0 = (int64_t)lz, y0 = (int64_t)ly, x0 = (int64_t)lx;
    const float fz[2] = {1.f - (p[0] - lz), p[0] - lz}, fy[2] = {1.f - (p[1] - ly), p[1] - ly},
                fx[2] = {1.f - (p[2] - lx), p[2] - lx};
    int n = 0;
    for (int a = 0; a < 2; a++) {
        if (z0 + a < 0 || z0 + a >= D)
            continue;
        for (int b = 0; b < 2; b++) {
            if (y0 + b < 0 || y0 + b >= H)
                continue;
            for (int e = 0; e < 2; e++) {
                if (x0 + e < 0 || x0 + e >= W)
                    continue;
                offset[n] = (((m * D + z0 + a) * H + y0 + b) * W + x0 + e) * C;
                f[n][0] = fz[a], f[n][1] = fy[b], f[n][2] = fx[e];
                upper[n] = a << 2 | b << 1 | e;
                n++;
            }
        }
    }
    return n;
}

void deform_forward(const int64_t *shape, int64_t r0, int64_t r1, const float *restrict x,
                    const float *restrict position, const float *restrict weight, float *restrict out)
{
    const int64_t C = shape[4], P = shape[5], T = shape[6];
    int64_t offset[8];
    float f[8][3];
    int upper[8];
    for (int64_t r = r0; r < r1; r++) {
        float *restrict o = out + r * C;
        int started = 0; /* the first voxel sets the row, the others add: no zeroing pass */
        for (int64_t t = 0; t < T; t++) {
            const float *restrict wt = weight + t * C;
            const int n = corners(shape, r / P, position + (r * T + t) * 3, offset, f, upper);
            for (int k = 0; k < n; k++, started = 1) {
                const float *restrict v = x + offset[k], w = f[k][0] * f[k][1] * f[k][2];
                if (started)
                    for (int64_t c = 0; c < C; c++)
                        o[c] += w * wt[c] * v[c];
                else
                    for (int64_t c = 0; c < C; c++)
                        o[c] = w * wt[c] * v[c];
            }
        }
        if (!started)
            for (int64_t c = 0; c < C; c++)
                o[c] = 0.f;
    }
}

/* grad_position (M, P, T, 3): per voxel, the dot product over channels of the output's gradient, the tap's weight
 * and the voxel's values, times its weight's derivative along each axis (the other two factors, signed by the
 * side). With grad_weight (not NULL), this call's part of the weight's gradient (T, C), which it zeroes first; the
 * caller adds the calls' parts. */
void deform_grad_position_weight(const int64_t *shape, int64_t r0, int64_t r1, const float *restrict x,
                                 const float *restrict position, const float *restrict weight,
                                 const float *restrict grad, float *restrict grad_position,
                                 float *restrict grad_weight)
{
    const int64_t C = shape[4], P = shape[5], T = shape[6];
    int64_t offset[8];
    float f[8][3];
    int upper[8];
    if (grad_weight)
        for (int64_t i = 0; i < T * C; i++)
            grad_weight[i] = 0.f;
    for (int64_t r = r0; r < r1; r++) {
        const float *restrict g = grad + r * C;
        for (int64_t t = 0; t < T; t++) {
            const float *restrict wt = weight + t * C;
            float *gp = grad_position + (r * T + t) * 3;
            gp[0] = gp[1] = gp[2] = 0.f;
            const int n = corners(shape, r / P, position + (r * T + t) * 3, offset, f, upper);
            for (int k = 0; k < n; k++) {
                const float *restrict v = x + offset[k], w = f[k][0] * f[k][1] * f[k][2];
                float dot = 0.f;
                if (grad_weight) {
                    float *restrict gw = grad_weight + t * C;
                    for (int64_t c = 0; c < C; c++) {
                        const float gv = g[c] * v[c];
                        dot += gv * wt[c];
                        gw[c] += w * gv;
                    }
                } else {
                    for (int64_t c = 0; c < C; c++)
                        dot += g[c] * v[c] * wt[c];
                }
                gp[0] += (upper[k] & 4 ? dot : -dot) * f[k][1] * f[k][2];
                gp[1] += (upper[k] & 2 ? dot : -dot) * f[k][0] * f[k][2];
                gp[2] += (upper[k] & 1 ? dot : -dot) * f[k][0] * f[k][1];
            }
        }
    }
}

/* grad_x (M, D, H, W, C), zeroed by the caller: each output gradient, weighed, added to its samples' voxels,
 * channels [c0, c1). */
void deform_grad_input(const int64_t *shape, int64_t c0, int64_t c1, const float *restrict position,
                       const float *restrict weight, const float *restrict grad, float *restrict grad_x)
{
    const int64_t C = shape[4], P = shape[5], T = shape[6], rows = shape[0] * P;
    int64_t offset[8];
    float f[8][3];
    int upper[8];
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict g = grad + r * C;
        for (int64_t t = 0; t < T; t++) {
            const float *restrict wt = weight + t * C;
            const int n = corners(shape, r / P, position + (r * T + t) * 3, offset, f, upper);
            for (int k = 0; k < n; k++) {
                float *restrict v = grad_x + offset[k];
                const float w = f[k][0] * f[k][1] * f[k][2];
                for (int64_t c = c0; c < c1; c++)
                    v[c] += w * wt[c] * g[c];
            }
        }
    }
}
