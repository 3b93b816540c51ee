// Preference (DPO-family) losses: one thread per pair, every weighted term summed in-kernel.
// Mirrors src/ops/prefloss.rs term by term. The per-pair math is in f64 (pairs are few, and f64
// keeps policy-ref differences of large sums and the clamped score exponentials exact); I/O is f32.
#include "common.cuh"

#define PREF_MAX_TERMS 8
#define PREF_BLOCK 256
#define SCORE_EXP_CLAMP 80.0

enum { T_SIGMOID = 0, T_HINGE, T_IPO, T_EXO, T_NCA, T_ROBUST, T_BCO, T_SPPO, T_APO_ZERO, T_APO_DOWN,
       T_DISCOPOP, T_SIGMOID_NORM, T_SFT };
enum { F_REVERSE_KL = 0, F_FORWARD_KL, F_JS, F_ALPHA };

// Layout mirrors `PrefParams` in src/ops/prefloss.rs (#[repr(C)]).
struct PrefParams {
    double beta, alpha, label_smoothing, robust_eps, exo_eps, tau;
    int fdiv, n_terms;
    int ids[PREF_MAX_TERMS];
    double weights[PREF_MAX_TERMS];
};

__device__ __forceinline__ double softplus_d(double x) { return fmax(x, 0.0) + log1p(exp(-fabs(x))); }
__device__ __forceinline__ double logsig_d(double x) { return -softplus_d(-x); }
__device__ __forceinline__ double sig_d(double x) {
    if (x >= 0.0) return 1.0 / (1.0 + exp(-x));
    const double e = exp(x);
    return e / (1.0 + e);
}

// s(r) and ds/dr.
__device__ __forceinline__ void score_d(int fdiv, double alpha, double r, double* s, double* ds) {
    if (fdiv == F_FORWARD_KL) {
        if (-r > SCORE_EXP_CLAMP) { *s = -exp(SCORE_EXP_CLAMP); *ds = 0.0; }
        else { const double e = exp(-r); *s = -e; *ds = e; }
    } else if (fdiv == F_JS) {
        *s = logsig_d(r); *ds = sig_d(-r);
    } else if (fdiv == F_ALPHA && alpha - 1.0 != 0.0) {
        const double a = alpha - 1.0, x = a * r;
        if (x > SCORE_EXP_CLAMP) { *s = exp(SCORE_EXP_CLAMP) / a; *ds = 0.0; }
        else { const double e = exp(x); *s = e / a; *ds = e; }
    } else {
        *s = r; *ds = 1.0;
    }
}

struct TermOut { double loss, ds_w, ds_l, dr_w, dr_l; };

__device__ __forceinline__ TermOut of_margin(double beta, double loss, double dz) {
    TermOut t = {loss, beta * dz, -beta * dz, 0.0, 0.0};
    return t;
}

__device__ TermOut pref_term(const PrefParams& p, int id, double r_w, double r_l, double s_w, double s_l,
                             double n_w, double n_l, double policy_w, double sft_scale) {
    const double b = p.beta, z = b * (s_w - s_l);
    TermOut t = {0.0, 0.0, 0.0, 0.0, 0.0};
    switch (id) {
    case T_SIGMOID: {
        const double e = p.label_smoothing;
        return of_margin(b, (1.0 - e) * softplus_d(-z) + e * softplus_d(z), -(1.0 - e) * sig_d(-z) + e * sig_d(z));
    }
    case T_HINGE:
        return z < 1.0 ? of_margin(b, 1.0 - z, -1.0) : of_margin(b, 0.0, 0.0);
    case T_IPO: {
        const double d = s_w / n_w - s_l / n_l - 1.0 / (2.0 * b);
        t.loss = d * d; t.ds_w = 2.0 * d / n_w; t.ds_l = -2.0 * d / n_l;
        return t;
    }
    case T_EXO: {
        const double e = p.exo_eps, p1 = sig_d(z), p0 = sig_d(-z);
        const double c1 = log(1.0 - e), c0 = log(e);
        return of_margin(b, p1 * (logsig_d(z) - c1) + p0 * (logsig_d(-z) - c0), p1 * p0 * (z - c1 + c0));
    }
    case T_NCA: {
        const double x = b * s_w, y = b * s_l;
        t.loss = softplus_d(-x) + 0.5 * softplus_d(x) + 0.5 * softplus_d(y);
        t.ds_w = b * (-sig_d(-x) + 0.5 * sig_d(x));
        t.ds_l = b * 0.5 * sig_d(y);
        return t;
    }
    case T_ROBUST: {
        const double e = p.robust_eps, k = 1.0 / (1.0 - 2.0 * e);
        return of_margin(b, k * ((1.0 - e) * softplus_d(-z) - e * softplus_d(z)),
                         k * (-(1.0 - e) * sig_d(-z) - e * sig_d(z)));
    }
    case T_BCO: {
        const double x = b * s_w, y = b * s_l;
        t.loss = softplus_d(-x) + softplus_d(y); t.ds_w = -b * sig_d(-x); t.ds_l = b * sig_d(y);
        return t;
    }
    case T_SPPO: {
        const double a = 1.0 / (2.0 * b), u = s_w - a, v = s_l + a;
        t.loss = u * u + v * v; t.ds_w = 2.0 * u; t.ds_l = 2.0 * v;
        return t;
    }
    case T_APO_ZERO: {
        const double x = b * r_w, y = b * r_l;
        t.loss = sig_d(-x) + sig_d(y);
        t.dr_w = -b * sig_d(x) * sig_d(-x);
        t.dr_l = b * sig_d(y) * sig_d(-y);
        return t;
    }
    case T_APO_DOWN: {
        const double x = b * s_w, dx = b * sig_d(x) * sig_d(-x), dz = b * sig_d(z) * sig_d(-z);
        t.loss = sig_d(x) + sig_d(-z); t.ds_w = dx - dz; t.ds_l = dz;
        return t;
    }
    case T_DISCOPOP: {
        const double tau = p.tau, lm = logsig_d(z / tau), l1m = logsig_d(-z / tau);
        const double one_minus_m = sig_d(-z / tau), a = softplus_d(-z);
        const double m_b = exp(lm - z), mm = exp(lm + l1m), mm_b = exp(lm + l1m - z);
        const double dz = (mm_b - mm * a) / tau - one_minus_m * sig_d(-z) - m_b;
        return of_margin(b, one_minus_m * a + m_b, dz);
    }
    case T_SIGMOID_NORM: {
        const double zn = b * (s_w / n_w - s_l / n_l), g = b * sig_d(-zn);
        t.loss = softplus_d(-zn); t.ds_w = -g / n_w; t.ds_l = g / n_l;
        return t;
    }
    case T_SFT:
        t.loss = -policy_w * sft_scale; t.dr_w = -sft_scale;
        return t;
    default:
        return t;
    }
}

// Σ max(chosen_counts, 0) over the whole batch, computed redundantly by every block (integer, so
// exact and order-independent) to keep the batch to ONE launch.
__device__ long long total_chosen_tokens(const int* __restrict__ counts, int n) {
    __shared__ long long part[PREF_BLOCK];
    long long acc = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) acc += (long long)max(counts[i], 0);
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if ((int)threadIdx.x < o) part[threadIdx.x] += part[threadIdx.x + o];
        __syncthreads();
    }
    const long long total = part[0];
    __syncthreads();
    return total;
}

// No __launch_bounds__: with it ptxas capped the f64 term switch at 128 registers and spilled.
extern "C" __global__ void
pref_loss_forward(const float* __restrict__ policy_chosen, const float* __restrict__ policy_rejected,
                  const float* __restrict__ ref_chosen, const float* __restrict__ ref_rejected,
                  const int* __restrict__ chosen_counts, const int* __restrict__ rejected_counts, int n,
                  const PrefParams params, int has_sft,
                  float* __restrict__ loss, float* __restrict__ dpolicy_chosen, float* __restrict__ dpolicy_rejected,
                  float* __restrict__ rewards_chosen, float* __restrict__ rewards_rejected,
                  float* __restrict__ margins, float* __restrict__ accuracies) {
    double sft_scale = 0.0;
    if (has_sft) {  // uniform across the block, so the barriers inside are safe
        const long long total = total_chosen_tokens(chosen_counts, n);
        sft_scale = (double)n / (double)(total > 0 ? total : 1);
    }
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const double pw = policy_chosen[i], pl = policy_rejected[i];
    const double r_w = pw - (double)ref_chosen[i], r_l = pl - (double)ref_rejected[i];
    const double n_w = (double)max(chosen_counts[i], 1), n_l = (double)max(rejected_counts[i], 1);
    double s_w, ds_w, s_l, ds_l;
    score_d(params.fdiv, params.alpha, r_w, &s_w, &ds_w);
    score_d(params.fdiv, params.alpha, r_l, &s_l, &ds_l);
    double L = 0.0, gw = 0.0, gl = 0.0;
    for (int k = 0; k < params.n_terms && k < PREF_MAX_TERMS; ++k) {
        const TermOut t = pref_term(params, params.ids[k], r_w, r_l, s_w, s_l, n_w, n_l, pw, sft_scale);
        const double w = params.weights[k];
        L += w * t.loss;
        gw += w * (t.ds_w * ds_w + t.dr_w);
        gl += w * (t.ds_l * ds_l + t.dr_l);
    }
    const double rc = params.beta * r_w, rr = params.beta * r_l;
    loss[i] = (float)L;
    dpolicy_chosen[i] = (float)gw;
    dpolicy_rejected[i] = (float)gl;
    rewards_chosen[i] = (float)rc;
    rewards_rejected[i] = (float)rr;
    margins[i] = (float)(rc - rr);
    accuracies[i] = rc > rr ? 1.f : 0.f;
}
