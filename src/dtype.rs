//! Element types for tensors that cross the API: logits and activations are stored as f32 or bf16,
//! and every reduction accumulates in f32 whatever the storage type.

use half::bf16;

/// A storage element type (f32 or bf16). Arithmetic always happens in f32 after [`Elem::to_f32`].
pub trait Elem: Copy + Send + Sync + Default + std::fmt::Debug + 'static {
    /// Short dtype name as in safetensors / PyTorch (`"f32"`, `"bf16"`).
    const NAME: &'static str;
    /// Exact widening to f32.
    fn to_f32(self) -> f32;
    /// Round-to-nearest-even narrowing from f32.
    fn from_f32(x: f32) -> Self;
}

impl Elem for f32 {
    const NAME: &'static str = "f32";
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Elem for bf16 {
    const NAME: &'static str = "bf16";
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}
