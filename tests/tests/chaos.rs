//! Scenario: the short chaos run (about a minute; `benches/chaos.sh` runs it
//! for minutes). A mesh on three etcd members with two control planes and
//! three services of three instances, mTLS on, steady traffic between the
//! services while a seeded injector kills, terminates and pauses apps,
//! sidecars, control planes and etcd members, applies valid and invalid
//! policies and adds and removes instances; then an overload. Every
//! invariant of the table must hold (see `weft_tests::chaos::invariants`).
//!
//! `CHAOS_SEED` replays a seed; the seed is printed first either way.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use weft_tests::chaos::{self, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_short_chaos_run_keeps_every_invariant() -> anyhow::Result<()> {
    let seed = chaos::seed_from_env()?;
    let app_bin = PathBuf::from(env!("CARGO_BIN_EXE_weft-chaos"));
    let report = chaos::run(Options::short(seed, app_bin)).await?;
    println!("{}", report.render());
    anyhow::ensure!(
        report.passed(),
        "an invariant failed (seed {seed}):\n{}",
        report.render()
    );
    Ok(())
}
