//! The layering of ARCHITECTURE.md ("The layering, and the test that checks
//! it"), checked against `cargo metadata`: `cargo test -p xtask`.

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::process::Command;

    use serde_json::Value;

    /// One row of ARCHITECTURE.md's table.
    struct Rule {
        /// A workspace member.
        package: &'static str,
        /// The workspace members it may depend on (normal and build
        /// dependencies; dev-dependencies are not checked).
        may_use: &'static [&'static str],
        /// Packages from outside the workspace it must never depend on directly.
        never: &'static [&'static str],
    }

    const CORE: &str = "dualstream-core";
    const CHANNEL: &str = "dualstream-channel";
    const KAFKA: &str = "dualstream-kafka";
    const REDIS: &str = "dualstream-redis";
    const PUBLISHER: &str = "dualstream-publisher";
    const BATCH: &str = "dualstream-batch";
    const HISTORY: &str = "dualstream-history";
    const HUB: &str = "dualstream-hub";
    const CONSUMER: &str = "dualstream-consumer";
    const FACADE: &str = "dualstream";
    const GATEWAY: &str = "dualstream-gateway";
    const DEVSTACK: &str = "dualstream-devstack";
    const HARNESS: &str = "dualstream-harness";
    const TESTS: &str = "dualstream-tests";
    const XTASK: &str = "xtask";

    /// The dev-only crates, and the only packages that may depend on each
    /// (in any kind, dev-dependencies included): no library crate does.
    const DEV_ONLY: &[(&str, &[&str])] = &[(DEVSTACK, &[HARNESS, TESTS, XTASK]), (HARNESS, &[])];

    /// No broker client and no runtime: the pure crates.
    const PURE: &[&str] = &["rdkafka", "deadpool-redis", "redis", "tokio"];
    /// No broker client at all.
    const NO_BROKER: &[&str] = &["rdkafka", "deadpool-redis", "redis"];
    /// No Redis client.
    const NO_REDIS: &[&str] = &["deadpool-redis", "redis"];
    /// No Kafka client.
    const NO_KAFKA: &[&str] = &["rdkafka"];

    const RULES: &[Rule] = &[
        Rule { package: CORE, may_use: &[], never: PURE },
        Rule { package: CHANNEL, may_use: &[CORE], never: PURE },
        Rule { package: KAFKA, may_use: &[CORE], never: NO_REDIS },
        Rule { package: REDIS, may_use: &[CORE, CHANNEL], never: NO_KAFKA },
        Rule { package: PUBLISHER, may_use: &[CORE], never: NO_BROKER },
        Rule { package: BATCH, may_use: &[CORE, PUBLISHER], never: NO_BROKER },
        Rule { package: HISTORY, may_use: &[CORE, KAFKA], never: NO_REDIS },
        Rule { package: HUB, may_use: &[CORE, CHANNEL, REDIS], never: NO_KAFKA },
        Rule { package: CONSUMER, may_use: &[CORE, HISTORY, HUB], never: NO_BROKER },
        Rule {
            package: FACADE,
            may_use: &[CORE, CHANNEL, KAFKA, REDIS, PUBLISHER, BATCH, HISTORY, HUB, CONSUMER],
            never: &[],
        },
        Rule { package: GATEWAY, may_use: &[CORE, CHANNEL, KAFKA, REDIS, PUBLISHER, BATCH, CONSUMER], never: NO_REDIS },
        Rule { package: DEVSTACK, may_use: &[FACADE], never: &[] },
        Rule { package: HARNESS, may_use: &[FACADE, GATEWAY, DEVSTACK], never: &[] },
        Rule { package: TESTS, may_use: &[FACADE, GATEWAY, DEVSTACK], never: &[] },
        Rule { package: XTASK, may_use: &[DEVSTACK], never: &[] },
        Rule { package: "dualstream-example-postgres", may_use: &[CORE, CHANNEL, PUBLISHER, BATCH], never: NO_BROKER },
    ];

    /// `cargo <args>` on this workspace: its standard output.
    fn cargo(args: &[&str]) -> Vec<u8> {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
        let output =
            Command::new(&cargo).args(args).args(["--manifest-path", manifest]).output().expect("could not run cargo");
        assert!(
            output.status.success(),
            "cargo {args:?} failed with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        output.stdout
    }

    /// `cargo metadata --format-version 1 --no-deps` of this workspace.
    fn metadata() -> Value {
        serde_json::from_slice(&cargo(&["metadata", "--format-version", "1", "--no-deps"]))
            .expect("cargo metadata printed no JSON")
    }

    /// Every package `package` builds with these arguments (normal
    /// dependencies, `cargo tree`).
    fn packages(package: &str, features: &[&str]) -> BTreeSet<String> {
        let args = [&["tree", "-p", package, "-e", "normal"][..], features, &["--prefix", "none", "--format", "{p}"]];
        let tree = String::from_utf8(cargo(&args.concat())).expect("cargo tree printed UTF-8");
        tree.lines().filter_map(|line| line.split_whitespace().next()).map(str::to_owned).collect()
    }

    /// Every package the facade builds with only `feature`.
    fn facade_packages(feature: &str) -> BTreeSet<String> {
        packages(FACADE, &["--no-default-features", "--features", feature])
    }

    /// The demo, a newcomer's first build, builds none of the bench's and
    /// the chaos run's dependencies, and `cargo xtask` none of the services'
    /// clients (ARCHITECTURE.md, `crates/harness` and `xtask/`).
    #[test]
    fn the_demo_and_xtask_build_only_what_they_use() {
        let demo = packages(HARNESS, &[]);
        assert!(demo.contains(DEVSTACK) && demo.contains("rdkafka"), "{demo:?}");
        for heavy in [GATEWAY, "axum", "mimalloc", "reqwest", "tokio-tungstenite", "dualstream-consumer"] {
            assert!(!demo.contains(heavy), "the demo's build pulls in {heavy}");
        }
        let xtask = packages(XTASK, &[]);
        for client in ["tokio", "rdkafka", "deadpool-redis", FACADE] {
            assert!(!xtask.contains(client), "xtask's build pulls in {client}");
        }
    }

    /// The facade's features pull in what they name: `hub` no Kafka client,
    /// `history` no Redis client, `consumer` both (ARCHITECTURE.md,
    /// `crates/dualstream`).
    #[test]
    fn facade_features_pull_in_only_what_they_name() {
        let hub = facade_packages("hub");
        assert!(hub.contains(HUB) && hub.contains("deadpool-redis"), "{hub:?}");
        for kafka in ["rdkafka", KAFKA, HISTORY, CONSUMER] {
            assert!(!hub.contains(kafka), "the hub feature pulls in {kafka}");
        }
        let history = facade_packages("history");
        assert!(history.contains(HISTORY) && history.contains("rdkafka"), "{history:?}");
        for redis in ["deadpool-redis", "redis", REDIS, HUB, CONSUMER] {
            assert!(!history.contains(redis), "the history feature pulls in {redis}");
        }
        let consumer = facade_packages("consumer");
        for both in [CONSUMER, HISTORY, HUB, "rdkafka", "deadpool-redis"] {
            assert!(consumer.contains(both), "the consumer feature lacks {both}");
        }
    }

    #[test]
    fn workspace_dependencies_follow_architecture_md() {
        let metadata = metadata();
        let packages = metadata["packages"].as_array().expect("cargo metadata has no packages");
        let members: BTreeSet<&str> = packages.iter().filter_map(|p| p["name"].as_str()).collect();
        let rules: BTreeMap<&str, &Rule> = RULES.iter().map(|r| (r.package, r)).collect();
        let dev_only: BTreeMap<&str, &[&str]> = DEV_ONLY.iter().copied().collect();

        let mut problems: Vec<String> = Vec::new();
        for rule in RULES {
            if !members.contains(rule.package) {
                problems.push(format!("the table names {}, which is not a workspace member", rule.package));
            }
        }
        for package in packages {
            let name = package["name"].as_str().expect("a package without a name");
            let Some(rule) = rules.get(name) else {
                problems.push(format!("{name} is a workspace member the table does not list"));
                continue;
            };
            let dependencies = package["dependencies"].as_array().expect("a package without dependencies");
            for dependency in dependencies {
                let dep = dependency["name"].as_str().expect("a dependency without a name");
                if dev_only.get(dep).is_some_and(|users| !users.contains(&name)) {
                    problems.push(format!("{name} depends on {dep}, which is dev-only"));
                }
                if dependency["kind"].as_str() == Some("dev") {
                    continue;
                }
                if members.contains(dep) && !rule.may_use.contains(&dep) {
                    problems.push(format!("{name} depends on {dep}; it may depend on {:?} only", rule.may_use));
                }
                if rule.never.contains(&dep) {
                    problems.push(format!("{name} depends on {dep} directly, which it must never do"));
                }
            }
        }
        assert!(
            problems.is_empty(),
            "the workspace breaks the layering of ARCHITECTURE.md (the table is in xtask/src/arch.rs; \
             change both together):\n{}",
            problems.join("\n")
        );
    }
}
