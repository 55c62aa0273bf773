//! dualstream on a Redis Cluster of three masters (sharded Pub/Sub), on a
//! test-owned cluster (`dualstream_tests::cluster::RedisCluster`); none of
//! these tests needs the stack of `cargo xtask up`.

use std::collections::BTreeSet;

use dualstream_tests::cluster::RedisCluster;

/// The fixture starts a healthy 3-master cluster whose slots are split over
/// all three nodes, and a killed node comes back on its port with its slots.
#[test]
fn the_fixture_starts_three_masters_and_restarts_one() {
    let mut cluster = RedisCluster::start();
    let ports = cluster.ports();
    assert_eq!(ports.len(), 3);
    let owners: BTreeSet<u16> = [0, 8_000, 16_383].iter().map(|&s| cluster.owner_of_slot(s)).collect();
    assert_eq!(owners, ports.iter().copied().collect(), "slots split over the three nodes");
    let owner = cluster.owner_of("events:user:octocat");
    let i = ports.iter().position(|&p| p == owner).expect("an owner among the nodes");
    cluster.kill(i);
    cluster.restart(i);
    assert_eq!(cluster.owner_of("events:user:octocat"), owner, "same slots after a restart");
    assert_eq!(cluster.ports(), ports);
}
