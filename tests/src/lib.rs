//! Shared fixtures of dualstream's integration tests: the services from
//! `cargo xtask up` (`KAFKA_BROKERS`, `REDIS_URL`) and the test-owned
//! processes, proxies and clients of `dualstream-devstack`, re-exported here
//! (a `redis-server`, `tansu` or gateway of a test's own, a 3-master Redis
//! Cluster, a delay proxy, topic creation, an independent Kafka read-back, a
//! Redis subscriber), plus a gateway in the test process ([`gateway`]) and a
//! chromedriver of a test's own ([`browser`]).

pub mod browser;
pub mod collector;
pub mod gateway;

pub use dualstream_devstack::clients::*;
pub use dualstream_devstack::{cluster, proxy};
pub use dualstream_devstack::{DurableEngine, OwnedBroker, OwnedGateway, OwnedRedis};
