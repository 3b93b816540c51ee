//! Shared helpers for the integration tests: fixture paths and golden-tensor loading.
#![allow(dead_code)]

use half::bf16;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `../shared/fixtures` next to the crate root.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures")
}

/// `../shared/data` next to the crate root.
pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data")
}

/// A golden tensor widened to f64 (I64 values converted exactly), with its shape and dtype.
pub struct Golden {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
    pub raw: Vec<u8>,
}

impl Golden {
    pub fn f32(&self) -> Vec<f32> {
        self.data.iter().map(|&x| x as f32).collect()
    }
    pub fn i64(&self) -> Vec<i64> {
        self.data.iter().map(|&x| x as i64).collect()
    }
    pub fn bf16(&self) -> Vec<bf16> {
        assert_eq!(self.dtype, Dtype::BF16);
        self.raw
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]))
            .collect()
    }
}

/// Every tensor of a safetensors file.
pub fn load_goldens(path: &std::path::Path) -> HashMap<String, Golden> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let raw = view.data().to_vec();
        let data: Vec<f64> = match view.dtype() {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            Dtype::F64 => raw
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dtype::I64 => raw
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            d => panic!("{name}: unexpected dtype {d:?}"),
        };
        out.insert(
            name,
            Golden {
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                data,
                raw,
            },
        );
    }
    out
}

/// Asserts `|a − b| <= atol + rtol·|b|` elementwise, naming the first offender.
pub fn assert_close(what: &str, got: &[f64], want: &[f64], rtol: f64, atol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= atol + rtol * w.abs(),
            "{what}[{i}]: got {g}, want {w} (|diff| {} > atol {atol} + rtol {rtol}·|want|)",
            (g - w).abs()
        );
    }
}

/// Prints the visible skip line GPU tests use on machines without a usable CUDA device and
/// returns true when the caller should skip.
pub fn skip_without_gpu(test: &str) -> bool {
    match irbridge::device::cuda_unavailable_reason(0) {
        None => false,
        Some(why) => {
            say_skipped(&format!("{test}: {why}"));
            true
        }
    }
}

/// Writes `skipped: no GPU (<what>)` straight to the process's stderr: the test harness captures
/// `println!`/`eprintln!` of passing tests, and a skip must show in every run's log.
pub fn say_skipped(what: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: no GPU ({what})");
}

/// Runs the `irbridge` binary of this build with `args`.
pub fn irbridge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_irbridge"))
        .args(args)
        .output()
        .expect("running irbridge")
}

/// A path as a command-line argument.
pub fn arg(p: &Path) -> String {
    p.display().to_string()
}

/// A fresh, empty folder under the system temp dir, unique to `tag` and this process.
pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("irbridge-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Exit code 1 and exactly one `error:` line on stderr containing `mentions`, no panic.
pub fn assert_clean_error(out: &Output, mentions: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "stderr: {err}");
    assert!(
        lines[0].contains(mentions),
        "`{}` should mention `{mentions}`",
        lines[0]
    );
}

/// A fresh scratch folder like [`temp_dir`], removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates `irbridge-test-<tag>-<pid>` empty.
    pub fn new(tag: &str) -> Self {
        TempDir(temp_dir(tag))
    }

    /// A path inside the folder.
    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
