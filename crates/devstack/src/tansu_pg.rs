//! The PostgreSQL database a durable tansu broker keeps its log in: created
//! when missing and given our schema for tansu 0.6's PostgreSQL engine
//! (`xtask/assets/tansu-0.6-postgres.sql`; the engine creates none itself),
//! all through the `psql` command. Used by `cargo xtask up --durable` and
//! by durable test brokers ([`crate::OwnedBroker::start_durable`]).

use std::fmt;
use std::io::Write;
use std::process::{Command, Stdio};

/// Our schema for tansu 0.6's PostgreSQL engine. Idempotent.
pub const SCHEMA: &str = include_str!("../../../xtask/assets/tansu-0.6-postgres.sql");

/// The database of `cargo xtask up --durable` when `DUALSTREAM_TANSU_PG`
/// is not set. `sslmode=disable`: where a server offers TLS, tansu 0.6
/// checks its certificate against the system's roots and the host name, which
/// a local server's self-signed one (Debian's "snakeoil", made out to its
/// host name) fails on 127.0.0.1.
pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/dualstream_tansu?sslmode=disable";

/// `DUALSTREAM_TANSU_PG`, or [`DEFAULT_URL`].
pub fn url_from_env() -> String {
    std::env::var("DUALSTREAM_TANSU_PG").ok().filter(|u| !u.is_empty()).unwrap_or_else(|| DEFAULT_URL.to_owned())
}

/// Why the database could not be made ready (or dropped).
#[derive(Debug)]
pub enum PgError {
    /// The `psql` command is not on PATH.
    NoPsql,
    /// The URL names no database, or one that is not a plain name
    /// (letters, digits, `_`).
    BadUrl(String),
    /// The server did not answer or refused the login (psql's message).
    Unreachable { url: String, why: String },
    /// A statement failed (psql's message).
    Sql { url: String, what: &'static str, why: String },
}

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoPsql => write!(
                f,
                "psql not found: the durable broker's PostgreSQL storage needs the PostgreSQL client \
                 (Debian/Ubuntu: `apt-get install postgresql-client`, or `postgresql` for a server too)"
            ),
            Self::BadUrl(url) => write!(
                f,
                "{url}: not a postgres://user@host:port/database URL with a plain database name \
                 (letters, digits, _)"
            ),
            Self::Unreachable { url, why } => write!(
                f,
                "PostgreSQL is not reachable at {url} ({why}); start it (Debian/Ubuntu: \
                 `pg_ctlcluster <version> main start`), point DUALSTREAM_TANSU_PG at another server, \
                 or keep the log in SQLite instead (`cargo xtask up --durable sqlite`)"
            ),
            Self::Sql { url, what, why } => write!(f, "{what} on {url}: {why}"),
        }
    }
}

impl std::error::Error for PgError {}

/// `url` as (everything before the database name, the name, `?` and the
/// parameters after it or "").
fn parts(url: &str) -> Result<(&str, &str, &str), PgError> {
    let bad = || PgError::BadUrl(url.to_owned());
    let scheme_end = url.find("://").ok_or_else(bad)? + 3;
    let slash = url[scheme_end..].find('/').ok_or_else(bad)? + scheme_end;
    let rest = &url[slash + 1..];
    let (db, query) = rest.find('?').map_or((rest, ""), |q| rest.split_at(q));
    if db.is_empty() || !db.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(bad());
    }
    Ok((&url[..=slash], db, query))
}

/// The URL of database `db` on the server of `url`.
pub fn with_database(url: &str, db: &str) -> Result<String, PgError> {
    let (base, _, query) = parts(url)?;
    Ok(format!("{base}{db}{query}"))
}

/// `url` split into the URL of the same server's `postgres` database and
/// the database's name.
fn split(url: &str) -> Result<(String, String), PgError> {
    Ok((with_database(url, "postgres")?, parts(url)?.1.to_owned()))
}

/// Run `sql` (on standard input) against `url`; psql's standard output, or
/// its complaint.
fn psql(url: &str, sql: &str) -> Result<String, (bool, String)> {
    let mut child = Command::new("psql")
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", url])
        .env("PGCONNECT_TIMEOUT", "5")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| (e.kind() == std::io::ErrorKind::NotFound, e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        // Notices ("already exists, skipping") are not news.
        let _ = stdin.write_all(format!("set client_min_messages = warning;\n{sql}").as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| (false, e.to_string()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err((false, String::from_utf8_lossy(&out.stderr).trim().to_owned()))
    }
}

/// Run `sql` on the database of `url` itself.
pub fn query(url: &str, sql: &str) -> Result<String, PgError> {
    on_server(url, url, "querying the broker's database", sql)
}

/// Run `sql` on the server's `postgres` database; a failure to connect is
/// [`PgError::Unreachable`].
fn on_server(url: &str, server: &str, what: &'static str, sql: &str) -> Result<String, PgError> {
    psql(server, sql).map_err(|(missing, why)| {
        if missing {
            PgError::NoPsql
        } else if why.contains("connection to server") || why.contains("could not connect") {
            PgError::Unreachable { url: url.to_owned(), why }
        } else {
            PgError::Sql { url: url.to_owned(), what, why }
        }
    })
}

/// Create the database of `url` if it does not exist, and apply the schema
/// (which changes nothing where it is already there). Returns whether the
/// database was created.
pub fn prepare(url: &str) -> Result<bool, PgError> {
    let (server, db) = split(url)?;
    let lookup = format!("select 1 from pg_database where datname = '{db}';");
    let exists = on_server(url, &server, "looking the database up", &lookup)?;
    let mut created = false;
    if exists.trim().is_empty() {
        match on_server(url, &server, "creating the database", &format!("create database \"{db}\";")) {
            Ok(_) => created = true,
            // Created by someone else meanwhile: as good.
            Err(PgError::Sql { why, .. }) if why.contains("already exists") => {}
            Err(e) => return Err(e),
        }
    }
    psql(url, SCHEMA).map_err(|(_, why)| PgError::Sql { url: url.to_owned(), what: "applying tansu's schema", why })?;
    Ok(created)
}

/// Drop the database of `url` (connections to it are ended first); a
/// missing one is fine.
pub fn drop_database(url: &str) -> Result<(), PgError> {
    let (server, db) = split(url)?;
    let sql = format!("drop database if exists \"{db}\" with (force);");
    on_server(url, &server, "dropping the database", &sql).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_server_and_database() {
        let (server, db) = split("postgres://postgres@127.0.0.1:5432/dualstream_tansu").expect("valid");
        assert_eq!((server.as_str(), db.as_str()), ("postgres://postgres@127.0.0.1:5432/postgres", "dualstream_tansu"));
        let (server, db) = split("postgres://u:p@h/d1?sslmode=disable").expect("valid");
        assert_eq!((server.as_str(), db.as_str()), ("postgres://u:p@h/postgres?sslmode=disable", "d1"));
        assert!(split("postgres://h:5432").is_err());
        assert!(split("postgres://h:5432/").is_err());
        assert!(split("postgres://h/x\";drop").is_err());
        assert_eq!(with_database("postgres://u@h:1/a?x=1", "b").expect("valid"), "postgres://u@h:1/b?x=1");
    }
}
