//! Every configuration type from JSON and from TOML text, then its `validate()` (the gateway's
//! `resolve()`, and its `Auth` from a resolved config): errors are fine, panics are not. A config
//! that validates also survives a JSON round trip unchanged.
#![no_main]

use dualstream_batch::BatchConfig;
use dualstream_consumer::{HubConfig, JoinConfig, ReplayConfig};
use dualstream_gateway::{Auth, GatewayConfig};
use dualstream_kafka::KafkaSinkConfig;
use dualstream_redis::RedisNotifierConfig;
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Both text forms of `data` decoded as `T`.
fn decoded<T: DeserializeOwned>(data: &[u8]) -> impl Iterator<Item = T> {
    let json = serde_json::from_slice::<T>(data).ok();
    let toml = std::str::from_utf8(data).ok().and_then(|s| toml::from_str::<T>(s).ok());
    json.into_iter().chain(toml)
}

fn check<T, E>(data: &[u8], validate: impl Fn(&T) -> Result<(), E>)
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    for config in decoded::<T>(data) {
        if validate(&config).is_ok() {
            let json = serde_json::to_vec(&config).expect("a config serializes");
            let back: T = serde_json::from_slice(&json).expect("a serialized config deserializes");
            assert_eq!(back, config);
            assert!(validate(&back).is_ok());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data, KafkaSinkConfig::validate);
    check(data, RedisNotifierConfig::validate);
    check(data, BatchConfig::validate);
    check(data, ReplayConfig::validate);
    check(data, HubConfig::validate);
    check(data, JoinConfig::validate);
    for config in decoded::<GatewayConfig>(data) {
        if let Ok(resolved) = config.resolve() {
            let _ = Auth::new(&resolved.auth);
            let json = serde_json::to_vec(&resolved).expect("a config serializes");
            let back: GatewayConfig = serde_json::from_slice(&json).expect("a serialized config deserializes");
            assert!(back.resolve().is_ok(), "a resolved config, written and read back, resolves");
        }
    }
});
