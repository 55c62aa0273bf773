//! `cargo xtask fuzz`: every cargo-fuzz target of fuzz/ for a bounded time, each starting from its
//! committed seeds (fuzz/corpus/<target>, never written to: libFuzzer grows fuzz/work/<target>).
//!
//! cargo-fuzz is installed with `cargo install` when missing. The targets need a nightly compiler
//! (sanitizer and coverage flags): the `nightly` toolchain when rustup has one, otherwise the
//! default toolchain with `RUSTC_BOOTSTRAP=1`. The sanitizer builds go to fuzz/target, away from
//! the workspace's target dir.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The targets, in the order they run (fuzz/fuzz_targets/<name>.rs).
pub(crate) const TARGETS: &[&str] = &["event_record", "notification", "channel_parse", "config", "gateway_ingest"];

/// The cargo-fuzz release `cargo xtask fuzz` installs when none is on the PATH.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

/// `cargo` through rustup's proxy, so that `+nightly` works (the `$CARGO` of `cargo xtask` is the
/// toolchain's own binary).
fn cargo_fuzz(nightly: bool) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.env_remove("RUSTUP_TOOLCHAIN").env_remove("CARGO_TARGET_DIR");
    if nightly {
        cmd.arg("+nightly");
    } else {
        cmd.env("RUSTC_BOOTSTRAP", "1");
    }
    cmd.arg("fuzz");
    cmd
}

fn has_nightly() -> bool {
    Command::new("cargo")
        .args(["+nightly", "--version"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn ensure_cargo_fuzz(nightly: bool) -> Result<(), String> {
    let present = cargo_fuzz(nightly)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        return Ok(());
    }
    eprintln!("xtask: cargo-fuzz is not installed; installing {CARGO_FUZZ_VERSION} (about 40 s on 2 cores)");
    crate::run(crate::cargo().args(["install", "cargo-fuzz", "--locked", "--version", CARGO_FUZZ_VERSION]))
}

/// What one target's run printed that matters.
#[derive(Debug, Default)]
struct Outcome {
    executions: Option<u64>,
    crashed: bool,
}

/// Run one target, echoing libFuzzer's output less its progress lines, and read its final stats.
fn run_target(nightly: bool, fuzz_dir: &Path, target: &str, seconds: u64) -> Result<Outcome, String> {
    let work = fuzz_dir.join("work").join(target);
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let mut cmd = cargo_fuzz(nightly);
    cmd.arg("run")
        .arg("--fuzz-dir")
        .arg(fuzz_dir)
        .arg("--target-dir")
        .arg(fuzz_dir.join("target"))
        .arg(target)
        .arg(&work)
        .arg(fuzz_dir.join("corpus").join(target))
        .args(["--", &format!("-max_total_time={seconds}"), "-print_final_stats=1", "-timeout=10"])
        .args(["-rss_limit_mb=2048"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("could not run cargo fuzz: {e}"))?;
    let stdout = child.stdout.take();
    let echo = std::thread::spawn(move || {
        if let Some(out) = stdout {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                println!("{line}");
            }
        }
    });
    let mut outcome = Outcome::default();
    if let Some(err) = child.stderr.take() {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
                outcome.executions = n.trim().parse().ok();
            }
            // libFuzzer's "#1234 NEW/REDUCE/pulse" progress lines and its recommended dictionary
            // ("\"sorce_type\" # Uses: 84"): thousands per run.
            let progress = line.starts_with('#') || (line.starts_with('"') && line.contains("# Uses: "));
            if !progress {
                eprintln!("{line}");
            }
        }
    }
    let _ = echo.join();
    let status = child.wait().map_err(|e| e.to_string())?;
    // A crash, a timeout (-timeout) or running out of memory (-rss_limit_mb): libFuzzer exits non-zero.
    outcome.crashed = !status.success();
    Ok(outcome)
}

/// Build every target once, then run each for `seconds`; fails if any crashed.
pub(crate) fn run(seconds: u64, only: &[String]) -> Result<(), String> {
    if let Some(unknown) = only.iter().find(|t| !TARGETS.contains(&t.as_str())) {
        return Err(format!("unknown fuzz target {unknown:?}; targets: {}", TARGETS.join(", ")));
    }
    let targets: Vec<&str> =
        TARGETS.iter().copied().filter(|t| only.is_empty() || only.iter().any(|o| o == t)).collect();
    let nightly = has_nightly();
    if !nightly {
        eprintln!("xtask: no nightly toolchain; building the fuzz targets with the default one and RUSTC_BOOTSTRAP=1");
    }
    ensure_cargo_fuzz(nightly)?;
    let fuzz_dir = root().join("fuzz");
    let started = std::time::Instant::now();
    let target_dir = fuzz_dir.join("target");
    crate::run(cargo_fuzz(nightly).arg("build").arg("--fuzz-dir").arg(&fuzz_dir).arg("--target-dir").arg(&target_dir))?;
    eprintln!("xtask: fuzz targets built in {:.0} s", started.elapsed().as_secs_f64());
    let mut results = Vec::new();
    for target in &targets {
        eprintln!("xtask: fuzzing {target} for {seconds} s");
        results.push((target, run_target(nightly, &fuzz_dir, target, seconds)?));
    }
    println!("xtask: fuzz summary ({seconds} s per target):");
    let mut failed = 0;
    for (target, o) in &results {
        let executions = o.executions.map_or("unknown".to_owned(), |n| n.to_string());
        let verdict = if o.crashed { "FAILED (the input is in fuzz/artifacts/)" } else { "ok" };
        println!("  {target:<16} {executions:>12} executions  {verdict}");
        failed += usize::from(o.crashed);
    }
    println!("fuzz: {} passed, {failed} failed", results.len() - failed);
    if failed > 0 {
        return Err(format!("{failed} fuzz target(s) crashed"));
    }
    Ok(())
}
