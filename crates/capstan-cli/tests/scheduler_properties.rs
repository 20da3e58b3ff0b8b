//! Property tests of the scheduler on random graphs, with real provider processes: dependencies
//! are never violated, the global and per-provider limits are never exceeded (measured by the
//! providers themselves and from the event stream), and every resource ends created, failed,
//! or skipped naming a failed dependency.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::process::{Command, Stdio};

use support::{capstan_bin, deployment, events, random_graph, Rng};

const JOBS: i64 = 4;
const LIMITS: [(&str, u32); 2] = [("a", 2), ("b", 3)];

#[test]
fn random_graphs_respect_dependencies_limits_and_failures() {
    for seed in 1..=6u64 {
        let mut rng = Rng::new(seed);
        let nodes = random_graph(&mut rng, 40, 3, 8, &["a", "b"]);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("capstan.json"),
            deployment(&nodes, &LIMITS, &mut rng, 15).to_string(),
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
        let mut running_total = 0i64;
        let mut running_by_provider: HashMap<String, i64> = HashMap::new();
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
                    running_total += 1;
                    let provider = event["provider"].as_str().unwrap().to_string();
                    let running = running_by_provider.entry(provider.clone()).or_default();
                    *running += 1;
                    let limit = LIMITS.iter().find(|(n, _)| *n == provider).unwrap().1 as i64;
                    assert!(
                        *running <= limit,
                        "{context}: provider {provider} ran {running} at once, limit {limit}"
                    );
                    assert!(
                        running_total <= JOBS,
                        "{context}: {running_total} operations at once, --jobs {JOBS}"
                    );
                }
                kind @ ("resource_complete" | "resource_failed") => {
                    running_total -= 1;
                    *running_by_provider.get_mut(&nodes[i].provider).unwrap() -= 1;
                    if kind == "resource_complete" {
                        completed_at.insert(i, position);
                        let peak = event["outputs"]["peak"].as_u64().unwrap();
                        let limit = LIMITS
                            .iter()
                            .find(|(n, _)| *n == nodes[i].provider)
                            .unwrap()
                            .1 as u64;
                        assert!(
                            peak <= limit,
                            "{context}: provider {} measured {peak} at once, limit {limit}",
                            nodes[i].provider
                        );
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
}
