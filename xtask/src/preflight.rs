//! What `cargo xtask test` needs from the machine besides Rust and tansu,
//! checked before anything long starts (the tansu install, the workspace
//! build): `redis-server` and `redis-cli`, Chromium and chromedriver for
//! `tests/tests/dashboard_browser.rs`, and PostgreSQL answering where
//! `DATABASE_URL` (the PostgreSQL sink example's tests) and
//! `DUALSTREAM_TANSU_PG` (`tests/tests/durable.rs`) point, by default
//! 127.0.0.1:5432, with `psql`.
//!
//! Run as root where `apt-get` exists, the command installs what is missing
//! (Debian's packages, as `.ci/run` did) and starts the local PostgreSQL;
//! otherwise it stops at once and prints the one command that does it.
//! [`plan`] decides, from what [`probe`] found, without side effects.

use std::net::{TcpStream, ToSocketAddrs};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::stack::which;

/// The address the tests' PostgreSQL URLs name by default.
const LOCAL_PG: &str = "127.0.0.1:5432";
/// Browsers the browser fixture (`tests/src/browser.rs`) accepts.
const BROWSERS: &[&str] = &["chromium", "chromium-browser", "google-chrome"];
/// The line `.ci/run` put first in a new cluster's pg_hba.conf: the tests log
/// in as `postgres` without a password over TCP.
const PG_TRUST: &str = "host all postgres 127.0.0.1/32 trust";

/// What a test run uses, from its `--only` names (none: everything).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Needs {
    /// Chromium and chromedriver.
    pub(crate) browser: bool,
    /// PostgreSQL and `psql`.
    pub(crate) postgres: bool,
}

impl Needs {
    pub(crate) fn of(only: &[String]) -> Self {
        let any = |names: &[&str]| only.is_empty() || only.iter().any(|o| names.contains(&o.as_str()));
        Self { browser: any(&["dashboard_browser"]), postgres: any(&["durable", "dualstream-example-postgres"]) }
    }
}

/// The PostgreSQL servers the tests use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Pg {
    /// Each answers, or none is needed.
    Answers,
    /// The local one (127.0.0.1:5432) does not answer; `installed`: Debian's
    /// cluster tools (`pg_ctlcluster`) are there.
    LocalDown { installed: bool },
    /// One elsewhere, named by `var`, does not answer: nothing to install.
    Elsewhere { var: &'static str, addr: String },
}

/// What [`probe`] found. Whatever the run does not need counts as present.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Found {
    pub(crate) redis_server: bool,
    pub(crate) redis_cli: bool,
    pub(crate) browser: bool,
    pub(crate) driver: bool,
    pub(crate) psql: bool,
    pub(crate) pg: Pg,
}

/// What to do before the tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Nothing is missing.
    Ready,
    /// Root with apt-get: run this `sh` script, which installs and starts what is missing.
    Fix { script: String, what: String },
    /// Stop now with this message.
    Stop(String),
}

/// The Debian packages that bring what is missing, each with what it is for.
fn packages(found: &Found) -> Vec<(&'static str, &'static str)> {
    let mut out = Vec::new();
    if !found.redis_server {
        out.push(("redis-server", "redis-server (every test's Redis)"));
    } else if !found.redis_cli {
        out.push(("redis-tools", "redis-cli (the Redis Cluster tests)"));
    }
    if !found.browser {
        out.push(("chromium", "Chromium (tests/tests/dashboard_browser.rs)"));
    }
    if !found.driver {
        out.push(("chromium-driver", "chromedriver (tests/tests/dashboard_browser.rs)"));
    }
    if found.pg == (Pg::LocalDown { installed: false }) {
        out.push((
            "postgresql",
            "PostgreSQL on 127.0.0.1:5432 (the PostgreSQL sink example's tests, tests/tests/durable.rs)",
        ));
    } else if !found.psql {
        out.push(("postgresql-client", "psql (tests/tests/durable.rs)"));
    }
    out
}

/// The script that installs `pkgs` and, when asked, starts the local
/// PostgreSQL cluster (after trusting the tests' user on loopback in a
/// cluster installed by this script), as `.ci/run` did.
fn script(pkgs: &[&str], start_pg: bool, new_pg: bool) -> String {
    let mut steps = Vec::new();
    if !pkgs.is_empty() {
        steps.push(format!("apt-get update -qq && apt-get install -y -qq {}", pkgs.join(" ")));
    }
    if start_pg {
        steps.push("v=$(ls /etc/postgresql | sort -V | tail -1)".to_owned());
        if new_pg {
            steps.push(format!("sed -i \"1i {PG_TRUST}\" /etc/postgresql/$v/main/pg_hba.conf"));
        }
        steps.push("{ pg_ctlcluster $v main start || pg_ctlcluster $v main reload; }".to_owned());
    }
    steps.join(" && ")
}

/// Decide from what was found, whether this is root and whether apt-get exists.
pub(crate) fn plan(found: &Found, root: bool, apt: bool) -> Plan {
    let pkgs = packages(found);
    let start_pg = matches!(found.pg, Pg::LocalDown { .. });
    let mut what: Vec<&str> = pkgs.iter().map(|(_, w)| *w).collect();
    if found.pg == (Pg::LocalDown { installed: true }) {
        what.push("PostgreSQL on 127.0.0.1:5432 to be started (installed, not answering)");
    }
    let elsewhere = match &found.pg {
        Pg::Elsewhere { var, addr } => Some(format!(
            "PostgreSQL at {addr} ({var}) does not answer: start it, or unset {var} to use a local one on {LOCAL_PG}"
        )),
        _ => None,
    };
    if what.is_empty() && elsewhere.is_none() {
        return Plan::Ready;
    }
    let names: Vec<&str> = pkgs.iter().map(|(p, _)| *p).collect();
    let fix = script(&names, start_pg, names.contains(&"postgresql"));
    if elsewhere.is_none() && root && apt {
        return Plan::Fix { script: fix, what: what.join("; ") };
    }
    let mut msg = String::from(
        "`cargo xtask test` stops here, before the tansu install and the workspace build: the tests need\n",
    );
    if let Some(e) = &elsewhere {
        msg.push_str(&format!("  - {e}\n"));
    }
    for w in &what {
        msg.push_str(&format!("  - {w}\n"));
    }
    if apt && !what.is_empty() {
        msg.push_str(&format!(
            "This one command provides {}; run it, then `cargo xtask test` again (run as root, `cargo xtask test` \
             runs it itself):\n  sudo sh -c '{fix}'",
            if what.len() == 1 { "it" } else { "them" }
        ));
    } else if !what.is_empty() {
        msg.push_str("This machine has no apt-get: ");
        if !names.is_empty() {
            msg.push_str(&format!("install them with its package manager (Debian's names: {}), ", names.join(" ")));
        }
        if start_pg {
            msg.push_str(&format!(
                "start PostgreSQL on {LOCAL_PG} with user postgres allowed in without a password (or point \
                 DATABASE_URL and DUALSTREAM_TANSU_PG at a server of yours), "
            ));
        }
        msg.push_str("then run `cargo xtask test` again.");
    }
    Plan::Stop(msg.trim_end().to_owned())
}

/// `host:port` of a PostgreSQL URL (`postgres://user@host:port/db?…`) or
/// libpq `key=value` string; `None` for a Unix socket (not checked here).
pub(crate) fn pg_addr(url: &str) -> Option<String> {
    let (host, port) = if let Some(rest) = url.strip_prefix("postgres://").or_else(|| url.strip_prefix("postgresql://"))
    {
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        let hostport = authority.rsplit('@').next().unwrap_or_default();
        // An IPv6 host is in brackets: `[::1]:5432`.
        let colon = hostport.rfind(':').filter(|&i| hostport[i..].chars().skip(1).all(|c| c.is_ascii_digit()));
        match colon {
            Some(i) => (hostport[..i].to_owned(), hostport[i + 1..].to_owned()),
            None => (hostport.to_owned(), String::new()),
        }
    } else {
        let get = |key: &str| {
            url.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')).map(str::to_owned))
        };
        (get("host").unwrap_or_default(), get("port").unwrap_or_default())
    };
    if host.is_empty() || host.starts_with('/') || host.contains("%2F") || host.contains("%2f") {
        return None;
    }
    let port = if port.is_empty() { "5432".to_owned() } else { port };
    Some(format!("{host}:{port}"))
}

fn is_local(addr: &str) -> bool {
    matches!(addr, "127.0.0.1:5432" | "localhost:5432" | "[::1]:5432")
}

fn answers(addr: &str) -> bool {
    addr.to_socket_addrs()
        .map(|mut addrs| addrs.any(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok()))
        .unwrap_or(false)
}

/// The PostgreSQL servers of `DATABASE_URL` and `DUALSTREAM_TANSU_PG` (each
/// 127.0.0.1:5432 when unset).
fn probe_pg() -> Pg {
    let mut local_down = false;
    for var in ["DATABASE_URL", "DUALSTREAM_TANSU_PG"] {
        let addr = match std::env::var(var).ok().filter(|u| !u.is_empty()) {
            Some(url) => match pg_addr(&url) {
                Some(addr) => addr,
                None => continue,
            },
            None => LOCAL_PG.to_owned(),
        };
        if answers(&addr) {
            continue;
        }
        if !is_local(&addr) {
            return Pg::Elsewhere { var, addr };
        }
        local_down = true;
    }
    if local_down {
        Pg::LocalDown { installed: which("pg_ctlcluster").is_some() }
    } else {
        Pg::Answers
    }
}

/// Look at the machine (no side effects).
pub(crate) fn probe(needs: Needs) -> Found {
    let on_path = |name: &str| which(name).is_some();
    Found {
        redis_server: on_path("redis-server"),
        redis_cli: on_path("redis-cli"),
        browser: !needs.browser || BROWSERS.iter().any(|b| on_path(b)),
        driver: !needs.browser || on_path("chromedriver"),
        psql: !needs.postgres || on_path("psql"),
        pg: if needs.postgres { probe_pg() } else { Pg::Answers },
    }
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

/// Make sure the machine has what a test run of `only` needs: install it
/// (root with apt-get) or stop at once saying how.
pub(crate) fn ensure(only: &[String]) -> Result<(), String> {
    let needs = Needs::of(only);
    let (script, what) = match plan(&probe(needs), is_root(), which("apt-get").is_some()) {
        Plan::Ready => return Ok(()),
        Plan::Stop(msg) => return Err(msg),
        Plan::Fix { script, what } => (script, what),
    };
    eprintln!("xtask: the tests need {what}; installing (as root, with apt-get):\n  {script}");
    let status = Command::new("sh")
        .args(["-c", &script])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .map_err(|e| format!("could not run sh: {e}"))?;
    if !status.success() {
        return Err(format!("installing what the tests need failed ({status}): {script}"));
    }
    // A cluster just started may take a moment to accept connections.
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        match plan(&probe(needs), false, false) {
            Plan::Ready => return Ok(()),
            Plan::Stop(msg) if Instant::now() >= until => {
                return Err(format!("after installing, the tests still lack:\n{msg}"));
            }
            _ => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Found {
        Found { redis_server: true, redis_cli: true, browser: true, driver: true, psql: true, pg: Pg::Answers }
    }

    #[test]
    fn nothing_missing_is_ready_whoever_runs_it() {
        for (root, apt) in [(true, true), (false, true), (true, false), (false, false)] {
            assert_eq!(plan(&all(), root, apt), Plan::Ready);
        }
    }

    #[test]
    fn root_with_apt_installs_the_browser_and_its_driver() {
        let found = Found { browser: false, driver: false, ..all() };
        let Plan::Fix { script, what } = plan(&found, true, true) else { panic!("not a fix") };
        assert_eq!(script, "apt-get update -qq && apt-get install -y -qq chromium chromium-driver");
        assert!(what.contains("Chromium") && what.contains("chromedriver"), "{what}");
    }

    #[test]
    fn a_new_postgresql_is_installed_trusted_and_started_as_ci_did() {
        let found = Found { psql: false, pg: Pg::LocalDown { installed: false }, ..all() };
        let Plan::Fix { script, .. } = plan(&found, true, true) else { panic!("not a fix") };
        assert_eq!(
            script,
            "apt-get update -qq && apt-get install -y -qq postgresql && v=$(ls /etc/postgresql | sort -V | tail -1) \
             && sed -i \"1i host all postgres 127.0.0.1/32 trust\" /etc/postgresql/$v/main/pg_hba.conf \
             && { pg_ctlcluster $v main start || pg_ctlcluster $v main reload; }"
        );
    }

    #[test]
    fn an_installed_postgresql_that_is_down_is_only_started() {
        let found = Found { pg: Pg::LocalDown { installed: true }, ..all() };
        let Plan::Fix { script, .. } = plan(&found, true, true) else { panic!("not a fix") };
        assert_eq!(
            script,
            "v=$(ls /etc/postgresql | sort -V | tail -1) && { pg_ctlcluster $v main start || pg_ctlcluster $v main reload; }"
        );
    }

    #[test]
    fn without_root_it_stops_with_the_one_command() {
        let found = Found { redis_server: false, redis_cli: false, driver: false, ..all() };
        let Plan::Stop(msg) = plan(&found, false, true) else { panic!("not a stop") };
        assert!(
            msg.ends_with("sudo sh -c 'apt-get update -qq && apt-get install -y -qq redis-server chromium-driver'"),
            "{msg}"
        );
        assert!(msg.contains("redis-server (") && msg.contains("chromedriver ("), "{msg}");
    }

    #[test]
    fn without_apt_it_stops_naming_the_packages() {
        let found = Found { psql: false, ..all() };
        let Plan::Stop(msg) = plan(&found, true, false) else { panic!("not a stop") };
        assert!(msg.contains("no apt-get") && msg.contains("postgresql-client") && !msg.contains("sudo"), "{msg}");
    }

    #[test]
    fn a_server_elsewhere_that_does_not_answer_stops_even_as_root() {
        let found =
            Found { browser: false, pg: Pg::Elsewhere { var: "DATABASE_URL", addr: "db:5433".into() }, ..all() };
        let Plan::Stop(msg) = plan(&found, true, true) else { panic!("not a stop") };
        assert!(msg.contains("db:5433 (DATABASE_URL)") && msg.contains("unset DATABASE_URL"), "{msg}");
        assert!(msg.contains("apt-get install -y -qq chromium'"), "{msg}");
    }

    #[test]
    fn only_the_named_tests_needs() {
        let of = |names: &[&str]| Needs::of(&names.iter().map(|n| n.to_string()).collect::<Vec<_>>());
        assert_eq!(of(&[]), Needs { browser: true, postgres: true });
        assert_eq!(of(&["consumer", "dualstream-history"]), Needs { browser: false, postgres: false });
        assert_eq!(of(&["dashboard_browser"]), Needs { browser: true, postgres: false });
        assert_eq!(of(&["durable"]), Needs { browser: false, postgres: true });
        assert_eq!(of(&["dualstream-example-postgres"]), Needs { browser: false, postgres: true });
    }

    #[test]
    fn postgresql_addresses_from_urls_and_key_values() {
        assert_eq!(pg_addr("postgres://postgres@127.0.0.1:5432/postgres").as_deref(), Some("127.0.0.1:5432"));
        assert_eq!(
            pg_addr("postgres://postgres@127.0.0.1:5432/dualstream_tansu?sslmode=disable").as_deref(),
            Some("127.0.0.1:5432")
        );
        assert_eq!(pg_addr("postgresql://u:p@db.example:6543").as_deref(), Some("db.example:6543"));
        assert_eq!(pg_addr("postgres://u@db/x").as_deref(), Some("db:5432"));
        assert_eq!(pg_addr("host=10.0.0.2 port=5433 user=postgres").as_deref(), Some("10.0.0.2:5433"));
        assert_eq!(pg_addr("host=localhost user=postgres").as_deref(), Some("localhost:5432"));
        assert_eq!(pg_addr("host=/var/run/postgresql user=postgres"), None);
        assert_eq!(pg_addr("postgres:///postgres"), None);
        assert_eq!(pg_addr("postgres://u@[::1]:5433/x").as_deref(), Some("[::1]:5433"));
        assert_eq!(pg_addr("postgres://u@[::1]/x").as_deref(), Some("[::1]:5432"));
        assert!(is_local("127.0.0.1:5432") && is_local("localhost:5432") && !is_local("127.0.0.1:5433"));
    }
}
