//! The soak's two checks: every write's outcome against the topic (kept as
//! two bits per event, so the log does not grow the RSS being watched), and
//! the growth detector for the sampled resources.

use std::sync::Mutex;

use super::checker::{self, Anomalies};
use super::{PoisonError, Told};

/// Each event's outcome, two bits per (source, seq): 0 not submitted,
/// 1 acknowledged, 2 failed, 3 unknown.
#[derive(Default)]
pub(crate) struct Outcomes {
    by_source: Mutex<Vec<Vec<u8>>>,
}

const ACKED: u8 = 1;
const FAILED: u8 = 2;
const UNKNOWN: u8 = 3;

fn get(bits: &[u8], seq: u64) -> u8 {
    bits.get((seq / 4) as usize).map_or(0, |b| (b >> ((seq % 4) * 2)) & 3)
}

impl Outcomes {
    pub(crate) fn record(&self, source: usize, seq: u64, told: &Told) {
        let v = match told {
            Told::Acked { .. } | Told::AckedSomewhere => ACKED,
            Told::Failed(_) => FAILED,
            Told::Unknown(_) => UNKNOWN,
        };
        let mut all = self.by_source.lock().unwrap_or_else(PoisonError::into_inner);
        if all.len() <= source {
            all.resize_with(source + 1, Vec::new);
        }
        let bits = &mut all[source];
        let i = (seq / 4) as usize;
        if bits.len() <= i {
            bits.resize(i + 1, 0);
        }
        bits[i] |= v << ((seq % 4) * 2);
    }

    /// Reads the topic back and holds it against the outcomes: lost,
    /// duplicated, failed-but-stored and malformed counted apart (so K lost
    /// writes cannot cancel K duplicates). Returns the anomalies and the
    /// unknown outcomes found stored.
    pub(crate) fn check(&self, brokers: &str, run_began_ms: u64) -> Result<(Anomalies, u64), String> {
        let all = self.by_source.lock().unwrap_or_else(PoisonError::into_inner);
        let mut seen: Vec<Vec<u8>> = all.iter().map(|b| vec![0; b.len() * 4 / 8 + 1]).collect();
        let mut a = Anomalies::default();
        let mut malformed_shown = 0;
        checker::read_back(brokers, |pos, r| match r.and_then(|e| checker::expect_chaos(&e, run_began_ms)) {
            Ok(s) if s.source < all.len() && get(&all[s.source], s.seq) != 0 => {
                let (i, bit) = ((s.seq / 8) as usize, 1u8 << (s.seq % 8));
                if seen[s.source][i] & bit != 0 {
                    a.duplicates += 1;
                }
                seen[s.source][i] |= bit;
            }
            Ok(s) => {
                a.malformed_records += 1;
                eprintln!("soak: {pos:?} holds s{} seq {}, never submitted", s.source, s.seq);
            }
            Err(e) => {
                a.malformed_records += 1;
                if malformed_shown < 10 {
                    malformed_shown += 1;
                    eprintln!("soak: malformed record at {pos:?}: {e}");
                }
            }
        })?;
        let mut unknown_stored = 0;
        for (source, bits) in all.iter().enumerate() {
            for seq in 0..bits.len() as u64 * 4 {
                let stored = seen[source][(seq / 8) as usize] & (1 << (seq % 8)) != 0;
                match (get(bits, seq), stored) {
                    (ACKED, false) => a.lost += 1,
                    (FAILED, true) => a.failed_but_stored += 1,
                    (UNKNOWN, true) => unknown_stored += 1,
                    _ => {}
                }
            }
        }
        Ok((a, unknown_stored))
    }
}

/// How a sampled resource is judged.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Judge {
    /// A leak: it keeps growing by more than this much a minute.
    Grows(f64),
    /// Only bounded: the RSS. mimalloc keeps the pages a transient backlog
    /// used (a 20-minute soak of 2026-12-05 held 44.7 MiB in mimalloc's arena
    /// with 2.5 MiB of Rust heap live, and its RSS stepped by 16 MiB with
    /// both heaps flat), so a step in the RSS is the allocator's, not a
    /// leak; the live heaps below are what a leak grows.
    Ceiling(f64),
}

/// What the soak samples, in the order of a sample's values, and how each
/// is judged. The growth floors are half of 1 MiB/min of either heap, 1
/// descriptor, connection or thread a minute, which a 15-minute soak must
/// catch; the engine's queue swings with every fault.
pub(crate) const RESOURCES: [(&str, Judge); 8] = [
    ("RSS (KiB)", Judge::Ceiling(262_144.0)),
    ("queue depth (events)", Judge::Grows(2_000.0)),
    ("open descriptors", Judge::Grows(0.5)),
    ("Kafka connections", Judge::Grows(0.5)),
    ("Redis connections", Judge::Grows(0.5)),
    ("Rust heap, live (KiB)", Judge::Grows(512.0)),
    ("C heap in use, librdkafka's (KiB)", Judge::Grows(512.0)),
    ("threads", Judge::Grows(0.5)),
];

/// The index of the Rust heap in a sample.
#[cfg(test)]
const RUST_HEAP: usize = 5;

/// The growth floor of resource `i`.
#[cfg(test)]
fn floor(i: usize) -> f64 {
    match RESOURCES[i].1 {
        Judge::Grows(f) => f,
        Judge::Ceiling(_) => unreachable!("resource {i} has a ceiling"),
    }
}

/// Whether resource `i`, sampled at `series`, fails its judge.
pub(crate) fn fails(i: usize, series: &[(f64, f64)]) -> bool {
    match RESOURCES[i].1 {
        Judge::Grows(floor) => resource_grows(series, floor),
        Judge::Ceiling(max) => series.iter().any(|s| s.1 > max),
    }
}

/// Whether a resource sampled at `samples` (seconds since the start, value)
/// keeps growing: after the first fifth (warm-up), the least-squares slope
/// of the whole is above `floor_per_min`, and that of the last half above
/// half of it (so a single step, a pool filling once, is not growth, while
/// a leak, which goes on, is).
pub(crate) fn resource_grows(samples: &[(f64, f64)], floor_per_min: f64) -> bool {
    let fitted = &samples[samples.len() / 5..];
    if fitted.len() < 8 {
        return false;
    }
    let (xs, ys): (Vec<f64>, Vec<f64>) = fitted.iter().copied().unzip();
    let half = xs.len() / 2;
    slope(&xs, &ys) * 60.0 > floor_per_min && slope(&xs[half..], &ys[half..]) * 60.0 > floor_per_min / 2.0
}

/// Least-squares slope of `ys` over `xs`.
pub(crate) fn slope(xs: &[f64], ys: &[f64]) -> f64 {
    let n = xs.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let num: f64 = xs.iter().zip(ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let den: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 15 minutes sampled every 5 s, as the soak does: `f(seconds, noise in -1..1)`.
    fn series(f: impl Fn(f64, f64) -> f64) -> Vec<(f64, f64)> {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        (0..180)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let noise = (state % 20_001) as f64 / 10_000.0 - 1.0;
                let t = f64::from(i) * 5.0;
                (t, f(t, noise))
            })
            .collect()
    }

    #[test]
    fn a_one_mib_per_minute_leak_fails_in_noise() {
        // 40 MiB, ±8 MiB of noise, 1 MiB more every minute.
        let rss = series(|t, n| 40_960.0 + 8_192.0 * n + 1_024.0 * t / 60.0);
        assert!(resource_grows(&rss, floor(RUST_HEAP)));
    }

    #[test]
    fn a_one_descriptor_per_minute_leak_fails() {
        // 30 descriptors, one more each minute, ±1 now and then.
        let fds = series(|t, n| 30.0 + (t / 60.0).floor() + n.round());
        assert!(resource_grows(&fds, floor(2)));
        let conns = series(|t, _| 2.0 + (t / 60.0).floor());
        assert!(resource_grows(&conns, floor(3)));
    }

    #[test]
    fn flat_noisy_series_pass() {
        let rss = series(|_, n| 40_960.0 + 8_192.0 * n);
        assert!(!resource_grows(&rss, floor(RUST_HEAP)));
        let fds = series(|_, n| 30.0 + n.round());
        assert!(!resource_grows(&fds, floor(2)));
        let queue = series(|t, n| if (t as u64 / 60) % 2 == 0 { 50.0 } else { 5_000.0 * n.abs() });
        assert!(!resource_grows(&queue, floor(1)));
        // A pool that fills once, mid-run (8 descriptors at minute 7), is bounded.
        let step = series(|t, n| 30.0 + if t > 420.0 { 8.0 } else { 0.0 } + n.round());
        assert!(!resource_grows(&step, floor(2)));
        // Warm-up growth is not fitted.
        let warm = series(|t, n| 20_000.0 + 20_000.0 * (t / 180.0).min(1.0) + 1_024.0 * n);
        assert!(!resource_grows(&warm, floor(RUST_HEAP)));
    }

    #[test]
    fn a_thread_leak_fails_and_the_rss_is_held_to_its_ceiling() {
        let threads = series(|t, _| 9.0 + (t / 60.0).floor());
        assert!(fails(7, &threads));
        // The RSS may step (the allocator keeps a backlog's pages) ...
        let rss = series(|t, n| 48_000.0 + if t > 700.0 { 16_000.0 } else { 0.0 } + 512.0 * n);
        assert!(!fails(0, &rss));
        // ... but not pass its ceiling.
        let huge = series(|t, _| 48_000.0 + 300.0 * t);
        assert!(fails(0, &huge));
    }

    #[test]
    fn outcomes_keep_two_bits_per_event() {
        let o = Outcomes::default();
        o.record(3, 5, &Told::Acked { partition: 0, offset: 1 });
        o.record(3, 6, &Told::Unknown(String::new()));
        o.record(3, 7, &Told::Failed(String::new()));
        let all = o.by_source.lock().unwrap_or_else(PoisonError::into_inner);
        assert_eq!((get(&all[3], 4), get(&all[3], 5), get(&all[3], 6), get(&all[3], 7)), (0, ACKED, UNKNOWN, FAILED));
    }
}
