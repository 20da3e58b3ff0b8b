//! Property tests of the scheduler on random graphs, with a real provider process: dependencies
//! are never violated, the global and per-provider limits are never exceeded (measured by the
//! provider itself: both provider names are one standing service, whose `probe` counts all
//! operations at once and those of each provider name), and every resource ends created,
//! failed, or skipped naming a failed dependency.

use std::collections::{BTreeMap, HashMap};
use std::process::{Command, Stdio};

use crate::support::{capstan_bin, deployment, events, random_graph, testing_provider, Rng};
use serde_json::{json, Value};

/// A testing provider serving at a socket until dropped.
struct Service {
    child: std::process::Child,
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Service {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("provider.sock");
        let child = Command::new(testing_provider())
            .args(["--listen", socket.to_str().unwrap()])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        crate::support::wait_until("the service listens", || socket.exists());
        Service {
            child,
            socket,
            _dir: dir,
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Points every provider at `service` (keeping its limit) and tags each probe with its
/// provider's name as its group.
fn through_service(mut deployment: Value, service: &Service) -> Value {
    for (_, decl) in deployment["providers"].as_object_mut().unwrap() {
        let limit = decl["maxConcurrency"].clone();
        *decl = json!({"socket": service.socket, "maxConcurrency": limit});
    }
    for (_, group) in deployment["resources"].as_object_mut().unwrap() {
        for (_, r) in group["resources"].as_object_mut().unwrap() {
            let provider = r["provider"].clone();
            r["inputs"]["group"] = provider;
        }
    }
    deployment
}

const JOBS: i64 = 4;
const LIMITS: [(&str, u32); 2] = [("a", 2), ("b", 3)];

#[test]
fn random_graphs_respect_dependencies_limits_and_failures() {
    // The most operations at once the provider saw in any run: the limit must also be reached,
    // or the test would pass with a scheduler that runs one at a time.
    let mut highest = 0;
    let mut highest_by_group: HashMap<String, u64> = HashMap::new();
    for seed in 1..=6u64 {
        let mut rng = Rng::new(seed);
        let nodes = random_graph(&mut rng, 40, 3, 8, &["a", "b"]);
        let dir = tempfile::tempdir().unwrap();
        let service = Service::start();
        std::fs::write(
            dir.path().join("capstan.json"),
            through_service(deployment(&nodes, &LIMITS, &mut rng, 15), &service).to_string(),
        )
        .unwrap();
        let out = Command::new(capstan_bin())
            .args(["apply", "--json", "--jobs", &JOBS.to_string()])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let events = events(&out.stdout);
        let context = format!("seed {seed}");

        // Expected end of every node, from the graph alone.
        let mut expected: Vec<&str> = Vec::new();
        for node in &nodes {
            let blocked = node.deps.iter().any(|&d| expected[d] != "complete");
            expected.push(if blocked {
                "skipped"
            } else if node.fail {
                "failed"
            } else {
                "complete"
            });
        }
        let any_problem = expected.iter().any(|e| *e != "complete");
        assert_eq!(
            out.status.code(),
            Some(if any_problem { 1 } else { 0 }),
            "{context}"
        );

        let index: HashMap<&str, usize> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.address.as_str(), i))
            .collect();
        let mut ended: BTreeMap<usize, &str> = BTreeMap::new();
        let mut completed_at: HashMap<usize, usize> = HashMap::new();
        for (position, event) in events.iter().enumerate() {
            let Some(address) = event["address"].as_str() else {
                continue;
            };
            let i = index[address];
            match event["type"].as_str().unwrap() {
                "resource_start" => {
                    for &d in &nodes[i].deps {
                        assert!(
                            completed_at.contains_key(&d),
                            "{context}: {address} started before its dependency {}",
                            nodes[d].address
                        );
                    }
                }
                kind @ ("resource_complete" | "resource_failed") => {
                    if kind == "resource_complete" {
                        completed_at.insert(i, position);
                        let peak = event["outputs"]["peak"].as_u64().unwrap();
                        assert!(
                            peak <= JOBS as u64,
                            "{context}: the provider measured {peak} operations at once, --jobs {JOBS}"
                        );
                        let group_peak = event["outputs"]["group_peak"].as_u64().unwrap();
                        let limit = LIMITS
                            .iter()
                            .find(|(n, _)| *n == nodes[i].provider)
                            .unwrap()
                            .1 as u64;
                        assert!(
                            group_peak <= limit,
                            "{context}: provider {} measured {group_peak} at once, limit {limit}",
                            nodes[i].provider
                        );
                        highest = highest.max(peak);
                        let seen = highest_by_group
                            .entry(nodes[i].provider.clone())
                            .or_default();
                        *seen = (*seen).max(group_peak);
                    }
                    ended.insert(
                        i,
                        if kind == "resource_complete" {
                            "complete"
                        } else {
                            "failed"
                        },
                    );
                }
                "resource_skipped" => {
                    let dependency = event["dependency"].as_str().unwrap();
                    assert_eq!(
                        expected[index[dependency]], "failed",
                        "{context}: {address} skipped for {dependency}, which did not fail"
                    );
                    ended.insert(i, "skipped");
                }
                _ => {}
            }
        }
        for (i, want) in expected.iter().enumerate() {
            assert_eq!(
                ended.get(&i).copied(),
                Some(*want),
                "{context}: {}",
                nodes[i].address
            );
        }
        let summary = events
            .iter()
            .rev()
            .find(|e| e["type"] == "summary")
            .expect("a summary");
        assert_eq!(
            summary["created"].as_u64().unwrap() as usize,
            expected.iter().filter(|e| **e == "complete").count(),
            "{context}"
        );
    }
    assert_eq!(
        highest, JOBS as u64,
        "over all runs the provider saw --jobs operations at once"
    );
    for (provider, limit) in LIMITS {
        assert_eq!(
            highest_by_group.get(provider).copied(),
            Some(limit as u64),
            "over all runs provider {provider} reached its limit"
        );
    }
}
