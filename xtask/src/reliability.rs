//! `cargo xtask chaos` and `cargo xtask soak`: run the `chaos` binary of
//! `dualstream-harness` (crates/harness/src/bin/chaos/), which starts its own tansu
//! (durable, on PostgreSQL or SQLite) and redis-server and harms only those.
//!
//! `--seeds N` runs the binary once per seed, each run on a fresh broker,
//! database and Redis, and prints one table row per seed from the
//! `summary:` line each run ends with. `--busy K` keeps K busy loops
//! running beside the runs, so races that idle cores hide can show.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use crate::{cargo, run, stack};

/// How `cargo xtask chaos` runs the binary.
pub(crate) struct Plan {
    /// Arguments for every run, without `--seed`.
    pub(crate) args: Vec<String>,
    /// The debug build (CI) instead of the release build.
    pub(crate) debug: bool,
    /// The seeds, one run each; empty: one run with a seed from the clock.
    pub(crate) seeds: Vec<u64>,
    /// Busy loops beside the runs.
    pub(crate) busy: usize,
}

/// `cargo run` of the chaos binary (after building the gateway binary it
/// starts, `dualstream-gateway`, into the same folder), or the binary named
/// by `DUALSTREAM_CHAOS_BIN` (one fixed build for a long table of seeds,
/// while the source tree changes; its gateway is `DUALSTREAM_GATEWAY_BIN`,
/// or `dualstream-gateway` beside it).
fn chaos_command(debug: bool, tansu: &std::path::Path) -> Result<Command, String> {
    let mut cmd = match std::env::var_os("DUALSTREAM_CHAOS_BIN") {
        Some(bin) => Command::new(bin),
        None => {
            let mut gateway = cargo();
            gateway.args(["build", "--quiet", "-p", "dualstream-gateway", "--bin", "dualstream-gateway"]);
            if !debug {
                gateway.arg("--release");
            }
            run(&mut gateway)?;
            let mut cmd = cargo();
            cmd.args(["run", "--quiet", "-p", "dualstream-harness", "--features", "chaos", "--bin", "chaos"]);
            if !debug {
                cmd.arg("--release");
            }
            cmd.arg("--");
            cmd
        }
    };
    cmd.env("DUALSTREAM_TANSU", tansu);
    Ok(cmd)
}

/// Busy loops, killed when dropped.
pub(crate) struct Busy(Vec<Child>);

impl Busy {
    pub(crate) fn start(n: usize) -> Result<Self, String> {
        let mut children = Vec::with_capacity(n);
        for _ in 0..n {
            let child = Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .stdin(Stdio::null())
                .spawn()
                .map_err(|e| format!("could not start a busy loop: {e}"))?;
            children.push(child);
        }
        if n > 0 {
            eprintln!("xtask: {n} busy loops running beside");
        }
        Ok(Self(children))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Build and run `chaos` as planned.
pub(crate) fn run_chaos(plan: Plan) -> Result<(), String> {
    let tansu = stack::install_tansu()?;
    let _busy = Busy::start(plan.busy)?;
    if plan.seeds.len() <= 1 {
        let mut cmd = chaos_command(plan.debug, &tansu)?;
        cmd.args(&plan.args);
        if plan.args.iter().any(|a| a == "--soak") && std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
            // Without transparent huge pages, so the RSS follows the heap: with
            // them, one byte touched in a fresh 2 MiB page of mimalloc's arena
            // makes all of it resident, and the RSS steps where nothing leaks
            // (docs/reliability.md, "Where the RSS growth came from").
            cmd.env("MIMALLOC_ALLOW_THP", "0");
        }
        if let Some(seed) = plan.seeds.first() {
            cmd.args(["--seed".to_owned(), seed.to_string()]);
        }
        return run(&mut cmd);
    }
    let mut rows = Vec::new();
    for seed in &plan.seeds {
        eprintln!("xtask: chaos seed {seed} ({} of {})", rows.len() + 1, plan.seeds.len());
        let mut cmd = chaos_command(plan.debug, &tansu)?;
        cmd.args(&plan.args).args(["--seed".to_owned(), seed.to_string()]).stdout(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| format!("could not run chaos: {e}"))?;
        let mut summary = None;
        if let Some(out) = child.stdout.take() {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                println!("{line}");
                if let Some(s) = line.strip_prefix("summary: ") {
                    summary = Some(s.to_owned());
                }
            }
        }
        let status = child.wait().map_err(|e| format!("chaos: {e}"))?;
        rows.push((*seed, status.success(), summary));
    }
    print_table(&rows);
    let failed: Vec<String> = rows.iter().filter(|r| !r.1).map(|r| r.0.to_string()).collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("chaos failed for seeds {} (replay one with --seed)", failed.join(", ")))
    }
}

/// The value of `key=` in a summary line.
fn field<'a>(summary: &'a str, key: &str) -> &'a str {
    summary.split_whitespace().find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('='))).unwrap_or("?")
}

fn print_table(rows: &[(u64, bool, Option<String>)]) {
    const COLUMNS: [&str; 30] = [
        "faults",
        "submitted",
        "acked",
        "unknown",
        "unknown_stored",
        "positionless",
        "lost",
        "duplicates",
        "order",
        "failed_but_stored",
        "wrong_position",
        "bad_notifications",
        "join_gaps",
        "join_duplicates",
        "broker_duplicates",
        "broker_order",
        "unknown_calm",
        "malformed_records",
        "malformed_notifications",
        "join_order",
        "join_wrong",
        "join_foreign",
        "join_errors",
        "gateway_items",
        "gateway_gaps",
        "gateway_duplicates",
        "gateway_order",
        "gateway_wrong",
        "gateway_errors",
        "gateway_resets",
    ];
    println!("\n| seed | {} | result |", COLUMNS.join(" | ").replace('_', " "));
    println!("|---|{}---|", "---|".repeat(COLUMNS.len()));
    for (seed, ok, summary) in rows {
        let s = summary.as_deref().unwrap_or("");
        let cells: Vec<&str> = COLUMNS.iter().map(|c| field(s, c)).collect();
        let result = match (ok, summary) {
            (true, _) => "ok",
            (false, Some(_)) => "FAILED",
            (false, None) => "FAILED (no summary: the run did not finish)",
        };
        println!("| {seed} | {} | {result} |", cells.join(" | "));
    }
}

#[cfg(test)]
mod tests {
    use super::field;

    #[test]
    fn summary_fields_are_read_by_name() {
        let s = "seed=7 lost=0 duplicates=12 order=3 result=FAILED";
        assert_eq!(field(s, "duplicates"), "12");
        assert_eq!(field(s, "lost"), "0");
        assert_eq!(field(s, "order"), "3");
        assert_eq!(field(s, "join_gaps"), "?");
    }
}
