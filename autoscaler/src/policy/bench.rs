//! The policies against each other in the simulator, on the benchmark profiles: how many
//! clients left unhappy and how many server-seconds each took against the oracle.
//!
//! Slower than a unit test (seconds in debug), so ignored by default:
//! `cargo test --release -p quire-autoscaler --lib policy::bench -- --ignored --nocapture`.
//! `QUIRE_BENCH_PROFILES` (`;`-separated) and `QUIRE_BENCH_SEEDS` (a count) override the
//! defaults; `QUIRE_BENCH_TIMELINE=<policy>` prints that policy's first run second by second.

use quire_loadgen::profile::Profile;

use super::{by_name, NAMES};
use crate::sim::{simulate, SimConfig};

const PROFILES: [&str; 3] =
    ["diurnal-40-180s,c-80-20s,diurnal-40-120s", "diurnal-40-120s", "c-20-30s,ramp-20-80-60s,c-80-30s,ramp-80-10-40s"];

#[test]
#[ignore = "runs the simulator: seconds in debug"]
fn policies_on_the_benchmark_profiles() {
    let profiles: Vec<String> = std::env::var("QUIRE_BENCH_PROFILES").map_or_else(
        |_| PROFILES.iter().map(|p| p.to_string()).collect(),
        |v| v.split(';').map(str::to_owned).collect(),
    );
    let seeds: u64 = std::env::var("QUIRE_BENCH_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    for spec in &profiles {
        let profile = Profile::parse(spec).expect("benchmark profile");
        println!("{spec}");
        for name in NAMES {
            let (mut unhappy, mut ratio, mut seconds) = (0.0, 0.0, [0.0; 3]);
            for seed in 1..=seeds {
                let policy = by_name(name).expect("known policy");
                let report = simulate(&profile, policy, SimConfig { seed, ..SimConfig::default() });
                unhappy += report.unhappy_pct / seeds as f64;
                ratio += report.ratio_to_oracle / seeds as f64;
                if seed == 1 && std::env::var("QUIRE_BENCH_TIMELINE").is_ok_and(|v| v == name) {
                    for p in &report.timeline {
                        let s = |t: &str| p.servers.get(t).copied().unwrap_or(0);
                        println!(
                            "    t {:4} clients/s {:5.1} servers {:3} {:3} {:3} oracle {:3} unhappy {:3} p99 {:5.0}",
                            p.t,
                            p.arrival_rate,
                            s("frontend"),
                            s("catalog"),
                            s("order"),
                            p.oracle_servers,
                            p.unhappy,
                            p.p99_ms
                        );
                    }
                }
                for (i, tier) in ["frontend", "catalog", "order"].into_iter().enumerate() {
                    let ours = report.server_seconds.get(tier).copied().unwrap_or(0.0);
                    let oracle = report.oracle_server_seconds.get(tier).copied().unwrap_or(1.0);
                    seconds[i] += ours / oracle / seeds as f64;
                }
            }
            println!(
                "  {name:8} unhappy {unhappy:5.2} %  server-seconds {ratio:4.2}× oracle \
                 (frontend {:4.2}, catalog {:4.2}, order {:4.2})",
                seconds[0], seconds[1], seconds[2]
            );
        }
    }
}
