//! `cargo xtask chaos` and `cargo xtask soak`: run the `chaos` binary of
//! `dualstream-tests` (tests/src/bin/chaos.rs), which starts its own tansu
//! (durable, on PostgreSQL or SQLite) and redis-server and harms only those.

use crate::{cargo, run, stack};

/// Build and run `chaos` with these arguments; `debug` skips the release
/// build (CI, where the test build has compiled the debug binary already).
pub(crate) fn run_chaos(args: Vec<String>, debug: bool) -> Result<(), String> {
    let tansu = stack::install_tansu()?;
    let mut cmd = cargo();
    cmd.args(["run", "--quiet", "-p", "dualstream-tests", "--bin", "chaos"]);
    if !debug {
        cmd.arg("--release");
    }
    cmd.arg("--").args(args).env("DUALSTREAM_TANSU", tansu);
    run(&mut cmd)
}
