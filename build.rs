//! Compiles every `kernels/*.cu` at build time and embeds the images in the crate.
//!
//! Each kernel file becomes two images: portable PTX for `compute_80` (JIT-compiled by the driver
//! on any Ampere-or-newer GPU) and an `sm_90` cubin (loaded as is on Hopper, no JIT). The
//! compiler is, in order of preference:
//!
//! 1. `nvcc` (from `$CUDA_HOME/bin`, `$CUDA_PATH/bin` or `PATH`);
//! 2. NVRTC from the PyPI wheels `nvidia-cuda-nvrtc-cu12` + `nvidia-cuda-runtime-cu12` (headers),
//!    installed by `scripts/install-cuda-toolchain` into `.cuda-toolchain/` (or the folder named by
//!    `IRBRIDGE_CUDA_TOOLCHAIN`), driven through `dlopen` so no CUDA install and no gcc is needed.
//!
//! A compile error or a register spill in the sm_90 build fails the build: the ptxas report is
//! written to `$OUT_DIR/kernel-report.txt`. Without any toolchain the crate builds the CPU engine
//! only and says so once (a cargo warning); `IRBRIDGE_REQUIRE_KERNELS=1` turns that into an error
//! (CI sets it so that every kernel is compiled on every run).

use std::ffi::{c_char, c_int, CStr, CString};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

const PTX_ARCH: &str = "compute_80";
const CUBIN_ARCH: &str = "sm_90";

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let kernel_dir = manifest.join("kernels");
    println!("cargo:rerun-if-changed=kernels");
    for var in [
        "IRBRIDGE_CUDA_TOOLCHAIN",
        "IRBRIDGE_REQUIRE_KERNELS",
        "IRBRIDGE_NO_KERNELS",
        "CUDA_HOME",
        "CUDA_PATH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let mut sources: Vec<PathBuf> = std::fs::read_dir(&kernel_dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "cu"))
                .collect()
        })
        .unwrap_or_default();
    sources.sort();
    for s in &sources {
        println!("cargo:rerun-if-changed={}", s.display());
    }

    let toolchain = if std::env::var_os("IRBRIDGE_NO_KERNELS").is_some() {
        None
    } else {
        Toolchain::find(&manifest)
    };
    let require = std::env::var("IRBRIDGE_REQUIRE_KERNELS").is_ok_and(|v| v == "1");

    let mut generated = String::new();
    let mut report = String::new();
    match &toolchain {
        None => {
            if require {
                panic!(
                    "IRBRIDGE_REQUIRE_KERNELS=1 but no CUDA compiler was found: install nvcc or run \
                     scripts/install-cuda-toolchain (NVRTC wheels into .cuda-toolchain/)"
                );
            }
            println!(
                "cargo:warning=irbridge: no CUDA compiler found (nvcc or .cuda-toolchain/); building \
                 the CPU engine only. Run scripts/install-cuda-toolchain to embed the CUDA kernels."
            );
            generated
                .push_str("/// No CUDA compiler was found at build time.\npub const TOOLCHAIN: Option<&str> = None;\n");
            generated.push_str("/// The kernel images embedded in this build (none).\npub const KERNEL_IMAGES: &[KernelImage] = &[];\n");
        }
        Some(tc) => {
            let desc = tc.describe();
            writeln!(
                generated,
                "/// The CUDA compiler used at build time.\npub const TOOLCHAIN: Option<&str> = Some({desc:?});"
            )
            .unwrap();
            generated.push_str("/// The kernel images embedded in this build, one per `kernels/*.cu`.\npub const KERNEL_IMAGES: &[KernelImage] = &[\n");
            for src in &sources {
                let stem = src.file_stem().unwrap().to_string_lossy().to_string();
                let ptx = tc
                    .compile(src, &kernel_dir, PTX_ARCH, false)
                    .unwrap_or_else(|e| panic!("compiling {} for {PTX_ARCH}:\n{e}", src.display()));
                let cubin = tc
                    .compile(src, &kernel_dir, CUBIN_ARCH, true)
                    .unwrap_or_else(|e| panic!("compiling {} for {CUBIN_ARCH}:\n{e}", src.display()));
                check_spills(&stem, &cubin.log);
                writeln!(report, "== {stem} ({CUBIN_ARCH})\n{}", cubin.log.trim()).unwrap();
                let ptx_path = out_dir.join(format!("{stem}.ptx"));
                let cubin_path = out_dir.join(format!("{stem}.{CUBIN_ARCH}.cubin"));
                std::fs::write(&ptx_path, &ptx.image).unwrap();
                std::fs::write(&cubin_path, &cubin.image).unwrap();
                writeln!(
                    generated,
                    "    KernelImage {{ name: {stem:?}, ptx: include_str!({:?}), cubin_sm90: include_bytes!({:?}) }},",
                    ptx_path.display().to_string(),
                    cubin_path.display().to_string()
                )
                .unwrap();
            }
            generated.push_str("];\n");
        }
    }
    std::fs::write(out_dir.join("kernel-report.txt"), report).unwrap();
    std::fs::write(out_dir.join("kernel_images.rs"), generated).unwrap();
}

/// ptxas reports spills per function as "N bytes spill stores, M bytes spill loads".
fn check_spills(stem: &str, log: &str) {
    let mut function = "?";
    for line in log.lines() {
        if let Some(pos) = line.find("Function properties for ") {
            function = line[pos + "Function properties for ".len()..].trim();
        }
        if let Some(pos) = line.find("bytes spill stores") {
            let head = &line[..pos];
            let stores: u64 = head
                .rsplit(|c: char| !c.is_ascii_digit())
                .find(|s| !s.is_empty())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let loads = line
                .split(',')
                .find(|s| s.contains("spill loads"))
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0);
            if stores > 0 || loads > 0 {
                panic!(
                    "kernels/{stem}.cu: register spill in `{function}` ({}):\n{log}",
                    line.trim()
                );
            }
        }
    }
}

struct Compiled {
    image: Vec<u8>,
    log: String,
}

enum Toolchain {
    Nvcc(PathBuf),
    Nvrtc { lib: PathBuf, include: PathBuf },
}

impl Toolchain {
    fn find(manifest: &Path) -> Option<Self> {
        for var in ["CUDA_HOME", "CUDA_PATH"] {
            if let Some(home) = std::env::var_os(var) {
                let nvcc = PathBuf::from(home).join("bin/nvcc");
                if nvcc.is_file() {
                    return Some(Toolchain::Nvcc(nvcc));
                }
            }
        }
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                let nvcc = dir.join("nvcc");
                if nvcc.is_file() {
                    return Some(Toolchain::Nvcc(nvcc));
                }
            }
        }
        let root = std::env::var_os("IRBRIDGE_CUDA_TOOLCHAIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| manifest.join(".cuda-toolchain"));
        let lib = root.join("nvidia/cuda_nvrtc/lib/libnvrtc.so.12");
        let include = root.join("nvidia/cuda_runtime/include");
        // Watch only paths that exist: cargo reruns a build script on every build while a
        // watched path is missing, which would recompile the crate on every `cargo run` of a
        // CPU-only machine. A toolchain installed later is picked up because
        // scripts/install-cuda-toolchain touches build.rs when it is done.
        if lib.is_file() {
            println!("cargo:rerun-if-changed={}", lib.display());
        } else if root.is_dir() {
            println!("cargo:rerun-if-changed={}", root.display());
        }
        (lib.is_file() && include.is_dir()).then_some(Toolchain::Nvrtc { lib, include })
    }

    fn describe(&self) -> String {
        match self {
            Toolchain::Nvcc(p) => format!("nvcc ({})", p.display()),
            Toolchain::Nvrtc { lib, .. } => match nvrtc_version(lib) {
                Ok((ma, mi)) => format!("NVRTC {ma}.{mi} ({})", lib.display()),
                Err(e) => format!("NVRTC ({}; version unknown: {e})", lib.display()),
            },
        }
    }

    fn compile(&self, src: &Path, include: &Path, arch: &str, cubin: bool) -> Result<Compiled, String> {
        match self {
            Toolchain::Nvcc(nvcc) => {
                let out = std::env::temp_dir().join(format!(
                    "irbridge-{}-{}-{arch}.{}",
                    std::process::id(),
                    src.file_stem().unwrap().to_string_lossy(),
                    if cubin { "cubin" } else { "ptx" }
                ));
                let mut cmd = Command::new(nvcc);
                cmd.arg(if cubin { "-cubin" } else { "-ptx" })
                    .arg(format!("-arch={arch}"))
                    .args(["-std=c++17", "-O3", "-lineinfo"])
                    .arg(format!("-I{}", include.display()))
                    .arg("-o")
                    .arg(&out)
                    .arg(src);
                if cubin {
                    cmd.arg("-Xptxas=-v");
                }
                let output = cmd.output().map_err(|e| format!("running {}: {e}", nvcc.display()))?;
                let log = format!(
                    "{}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                );
                if !output.status.success() {
                    return Err(log);
                }
                let image = std::fs::read(&out).map_err(|e| e.to_string())?;
                let _ = std::fs::remove_file(&out);
                Ok(Compiled { image, log })
            }
            Toolchain::Nvrtc {
                lib,
                include: cuda_include,
            } => {
                let source = std::fs::read_to_string(src).map_err(|e| e.to_string())?;
                let opts = vec![
                    format!("--gpu-architecture={arch}"),
                    "-std=c++17".to_string(),
                    "-lineinfo".to_string(),
                    format!("-I{}", include.display()),
                    format!("-I{}", cuda_include.display()),
                ];
                let mut opts = opts;
                if cubin {
                    opts.push("--ptxas-options=-v".to_string());
                }
                nvrtc_compile(lib, &source, &src.display().to_string(), &opts, cubin)
            }
        }
    }
}

type NvrtcProgram = *mut std::ffi::c_void;

fn nvrtc_version(lib: &Path) -> Result<(i32, i32), String> {
    unsafe {
        let l = libloading::Library::new(lib).map_err(|e| e.to_string())?;
        let f: libloading::Symbol<unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int> =
            l.get(b"nvrtcVersion").map_err(|e| e.to_string())?;
        let (mut ma, mut mi) = (0, 0);
        f(&mut ma, &mut mi);
        Ok((ma, mi))
    }
}

/// Drives NVRTC through its C API (only the nine entry points this needs).
fn nvrtc_compile(lib: &Path, source: &str, name: &str, opts: &[String], cubin: bool) -> Result<Compiled, String> {
    type Create = unsafe extern "C" fn(
        *mut NvrtcProgram,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> c_int;
    type CompileFn = unsafe extern "C" fn(NvrtcProgram, c_int, *const *const c_char) -> c_int;
    type SizeFn = unsafe extern "C" fn(NvrtcProgram, *mut usize) -> c_int;
    type GetFn = unsafe extern "C" fn(NvrtcProgram, *mut c_char) -> c_int;
    type Destroy = unsafe extern "C" fn(*mut NvrtcProgram) -> c_int;
    unsafe {
        let l = libloading::Library::new(lib).map_err(|e| format!("loading {}: {e}", lib.display()))?;
        let sym = |n: &[u8]| -> Result<*const (), String> {
            l.get::<*const ()>(n)
                .map(|s| *s)
                .map_err(|e| format!("{}: {e}", String::from_utf8_lossy(n)))
        };
        let create: Create = std::mem::transmute(sym(b"nvrtcCreateProgram")?);
        let compile: CompileFn = std::mem::transmute(sym(b"nvrtcCompileProgram")?);
        let log_size: SizeFn = std::mem::transmute(sym(b"nvrtcGetProgramLogSize")?);
        let get_log: GetFn = std::mem::transmute(sym(b"nvrtcGetProgramLog")?);
        let (size_name, get_name): (&[u8], &[u8]) = if cubin {
            (b"nvrtcGetCUBINSize", b"nvrtcGetCUBIN")
        } else {
            (b"nvrtcGetPTXSize", b"nvrtcGetPTX")
        };
        let image_size: SizeFn = std::mem::transmute(sym(size_name)?);
        let get_image: GetFn = std::mem::transmute(sym(get_name)?);
        let destroy: Destroy = std::mem::transmute(sym(b"nvrtcDestroyProgram")?);

        let c_src = CString::new(source).map_err(|e| e.to_string())?;
        let c_name = CString::new(name).map_err(|e| e.to_string())?;
        let mut prog: NvrtcProgram = std::ptr::null_mut();
        let rc = create(
            &mut prog,
            c_src.as_ptr(),
            c_name.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        );
        if rc != 0 {
            return Err(format!("nvrtcCreateProgram failed with code {rc}"));
        }
        let c_opts: Vec<CString> = opts.iter().map(|o| CString::new(o.as_str()).unwrap()).collect();
        let ptrs: Vec<*const c_char> = c_opts.iter().map(|c| c.as_ptr()).collect();
        let rc = compile(prog, ptrs.len() as c_int, ptrs.as_ptr());
        let mut n = 0usize;
        log_size(prog, &mut n);
        let mut buf = vec![0 as c_char; n.max(1)];
        get_log(prog, buf.as_mut_ptr());
        let log = CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned();
        if rc != 0 {
            destroy(&mut prog);
            return Err(format!("NVRTC error {rc}:\n{log}"));
        }
        image_size(prog, &mut n);
        let mut image = vec![0u8; n];
        get_image(prog, image.as_mut_ptr() as *mut c_char);
        destroy(&mut prog);
        if !cubin {
            // PTX comes NUL-terminated; include_str! wants the text alone.
            while image.last() == Some(&0) {
                image.pop();
            }
        }
        Ok(Compiled { image, log })
    }
}
