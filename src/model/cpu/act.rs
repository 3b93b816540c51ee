//! MLP activations: GPT-2's `gelu_new` (tanh approximation) and the Llama SwiGLU gate
//! `silu(gate) · up`, forward and backward, elementwise and parallel.

use rayon::prelude::*;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044715;

/// `y = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
pub fn gelu_forward(x: &[f32], y: &mut [f32]) {
    y.par_iter_mut().zip(x.par_iter()).for_each(|(y, &x)| {
        *y = 0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + GELU_C * x * x * x)).tanh());
    });
}

/// `d` (holding ∂L/∂y on entry) becomes ∂L/∂x, given the saved pre-activation `x`.
pub fn gelu_backward(x: &[f32], d: &mut [f32]) {
    d.par_iter_mut().zip(x.par_iter()).for_each(|(d, &x)| {
        let th = (SQRT_2_OVER_PI * (x + GELU_C * x * x * x)).tanh();
        let dudx = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x * x);
        *d *= 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * dudx;
    });
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `s = silu(gate) · up` with `silu(g) = g·σ(g)`.
pub fn swiglu_forward(gate: &[f32], up: &[f32], s: &mut [f32]) {
    s.par_iter_mut()
        .zip(gate.par_iter().zip(up.par_iter()))
        .for_each(|(s, (&g, &u))| {
            *s = g * sigmoid(g) * u;
        });
}

/// From `ds` = ∂L/∂s: `dgate = ds·up·silu'(gate)`, `dup = ds·silu(gate)`.
pub fn swiglu_backward(gate: &[f32], up: &[f32], ds: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    dgate
        .par_iter_mut()
        .zip(dup.par_iter_mut())
        .enumerate()
        .for_each(|(i, (dg, du))| {
            let (g, u, d) = (gate[i], up[i], ds[i]);
            let sg = sigmoid(g);
            *du = d * g * sg;
            *dg = d * u * sg * (1.0 + g * (1.0 - sg));
        });
}
