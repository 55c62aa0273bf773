//! The report: docs/benchmarks.md and target/bench/results.json, with the
//! criterion figures of `cargo bench -p dualstream --bench micro`.

use std::time::Duration;

use dualstream_devstack::clients::*;

use crate::Row;

pub(super) fn write_report(rows: &[Row], full: bool, filters: &[String], took: Duration) {
    // The workspace's root: this crate is crates/harness.
    let root = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    let mut md = String::new();
    md.push_str("# Benchmarks\n\n");
    md.push_str("Produced by `cargo xtask bench");
    if full {
        md.push_str(" --full");
    }
    for f in filters {
        md.push_str(&format!(" --filter {f}"));
    }
    md.push_str("`, which overwrites this file; machine-readable results are in `target/bench/results.json`.\n\n");
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    md.push_str(&format!(
        "- machine: {} cores ({cpu}), {} \n- broker: `{}` (tansu when started by `cargo xtask`), Redis: `{}`\n- producer settings (both sides): dualstream's `KafkaSinkConfig::default()` (acks=all, idempotent, linger 5 ms, no compression)\n- run took {:.0} s\n\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| s.lines().next().map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))).map(|m| format!("{m} memory")).unwrap_or_default(),
        kafka_brokers(),
        redis_url(),
        took.as_secs_f64()
    ));
    md.push_str("CPU: core-µs per event, `bench process + broker + redis-server` (from /proc; `?` where the process is not on this machine), ours / baseline.\n\n");
    md.push_str(
        "| figure | ours | baseline | ratio | goal | met | CPU ours / baseline |\n|---|---:|---:|---:|---|---|---|\n",
    );
    for r in rows {
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "-",
        };
        let cpu = r.cpu.map(|(o, b)| format!("{o} / {b}")).unwrap_or_else(|| "-".into());
        // Rows without a baseline (NaN) show none and no ratio.
        let (baseline, ratio) = if r.baseline.is_nan() {
            ("-".to_owned(), "-".to_owned())
        } else {
            (format!("{:.2}", r.baseline), format!("{:.2}", r.ours / r.baseline))
        };
        md.push_str(&format!(
            "| {} | {:.2} | {baseline} | {ratio} | {} | {} | {} |\n",
            r.name, r.ours, r.goal, met, cpu
        ));
    }
    let micro = criterion_figures(&root.join("target/criterion"));
    if !micro.is_empty() {
        md.push_str("\nMicro benchmarks (criterion, `cargo bench -p dualstream --bench micro`, mean time per iteration):\n\n| benchmark | mean | throughput |\n|---|---:|---:|\n");
        for (name, ns, elements) in &micro {
            let shown = if *ns >= 1e6 { format!("{:.3} ms", ns / 1e6) } else { format!("{ns:.1} ns") };
            let rate = elements.map(|n| format!("{:.0} events/s", n as f64 / (ns / 1e9))).unwrap_or_else(|| "-".into());
            md.push_str(&format!("| {name} | {shown} | {rate} |\n"));
        }
    }
    md.push_str("\nNotes per row:\n\n");
    for r in rows {
        md.push_str(&format!("- *{}*: {}\n", r.name, r.note));
    }
    std::fs::write(root.join("docs/benchmarks.md"), &md).expect("write report");
    let json: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let baseline = (!r.baseline.is_nan()).then_some(r.baseline);
            serde_json::json!({"group": r.group, "name": r.name, "ours": r.ours, "baseline": baseline,
                "unit": r.unit, "ratio": baseline.map(|b| r.ours / b), "goal": r.goal, "met": r.met, "note": r.note,
                "cpu_us_per_event": r.cpu.map(|(o, b)| serde_json::json!({"ours": o.json(), "baseline": b.json()}))})
        })
        .collect();
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir).expect("target/bench");
    std::fs::write(dir.join("results.json"), serde_json::to_string_pretty(&json).expect("json")).expect("write json");
    println!("{md}");
}

/// Every criterion result under `dir`: (benchmark id, mean ns per
/// iteration, elements per iteration when the benchmark declares a
/// throughput).
fn criterion_figures(dir: &std::path::Path) -> Vec<(String, f64, Option<u64>)> {
    let mut out = Vec::new();
    let Ok(groups) = std::fs::read_dir(dir) else { return out };
    for group in groups.flatten() {
        let Ok(benches) = std::fs::read_dir(group.path()) else { continue };
        for bench in benches.flatten() {
            let new = bench.path().join("new");
            let read = |f: &str| {
                std::fs::read_to_string(new.join(f))
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            };
            if let (Some(meta), Some(est)) = (read("benchmark.json"), read("estimates.json")) {
                if let (Some(id), Some(mean)) = (meta["full_id"].as_str(), est["mean"]["point_estimate"].as_f64()) {
                    out.push((id.to_owned(), mean, meta["throughput"]["Elements"].as_u64()));
                }
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}
