//! Knobs from the environment, for the harness's programs (each includes
//! this file as a module of its own and uses what it needs).
#![allow(dead_code)]

use std::str::FromStr;

/// The value of the environment variable `name`, when set. A value that does
/// not parse stops the run with its name, rather than run with the default
/// as if the knob were not set.
pub(crate) fn env_knob<T: FromStr>(name: &str) -> Option<T> {
    let v = std::env::var(name).ok()?;
    Some(v.trim().parse().unwrap_or_else(|_| panic!("{name}={v:?}: not a {}", std::any::type_name::<T>())))
}

/// A comma-separated list from the environment variable `name`, when set;
/// an item that does not parse stops the run, as in [`env_knob`].
pub(crate) fn env_list<T: FromStr>(name: &str) -> Option<Vec<T>> {
    let v = std::env::var(name).ok()?;
    let item = |r: &str| r.trim().parse().unwrap_or_else(|_| panic!("{name}={v:?}: {r:?} is not a {}", std::any::type_name::<T>()));
    Some(v.split(',').map(item).collect())
}
