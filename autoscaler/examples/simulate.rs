//! `cargo run --release -p quire-autoscaler --example simulate -- --profile diurnal-700-24h`:
//! `quire simulate` with the run's size and speed on stderr (events, requests, events/s).

use std::time::Instant;

use clap::Parser;
use quire_autoscaler::policy;
use quire_autoscaler::sim::{self, SimConfig, SimulateArgs};
use quire_loadgen::profile::Profile;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: SimulateArgs,
}

fn main() -> anyhow::Result<()> {
    let args = Cli::parse().args;
    let profile = Profile::parse(&args.profile)?;
    let policy = policy::by_name(&args.policy).ok_or_else(|| anyhow::anyhow!("unknown policy {}", args.policy))?;
    let config = SimConfig { seed: args.seed, initial: args.initial, ..SimConfig::default() };
    let started = Instant::now();
    let (report, tally) = sim::simulate_counted(&profile, policy, config);
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "{:.2} s wall; {} events ({:.1} M/s), {} requests ({:.1} M/s), {} clients",
        seconds,
        tally.events,
        tally.events as f64 / seconds / 1e6,
        tally.requests,
        tally.requests as f64 / seconds / 1e6,
        tally.clients,
    );
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}
