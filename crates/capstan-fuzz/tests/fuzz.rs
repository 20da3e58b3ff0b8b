//! The fuzz targets on stable, bounded: every input of `fuzz/corpus/<target>/` (crashes found
//! before are kept there as regression inputs), recorded real traffic for the stream
//! targets, then a fixed number of seeded mutations of them (bit flips, truncations,
//! duplicated, dropped and spliced runs of bytes). An input that panics, or takes longer than
//! a few seconds, fails the test and is written to `fuzz/artifacts/<target>/` to keep.
//! `CAPSTAN_FUZZ_ITERATIONS` sets the mutations per target (default 1500; a tenth for the
//! stream targets, which start a runtime per input); `CAPSTAN_FUZZ_SEED` the seed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let mut inputs: Vec<Vec<u8>> = ["corpus", "artifacts"]
        .iter()
        .flat_map(|kind| {
            std::fs::read_dir(root().join(kind).join(target))
                .into_iter()
                .flatten()
        })
        .flatten()
        .filter(|e| e.path().is_file() && e.file_name() != "README")
        .filter_map(|e| std::fs::read(e.path()).ok())
        .collect();
    if target == "provider_stream" || target == "host_stream" {
        let (to_provider, to_host) = capstan_fuzz::recorded_traffic();
        inputs.push(if target == "provider_stream" {
            to_provider
        } else {
            to_host
        });
    }
    if target == "wire_values" {
        inputs.extend(capstan_fuzz::wire_seeds());
    }
    if inputs.is_empty() {
        inputs.push(Vec::new());
    }
    inputs
}

/// xorshift64*: small, seeded, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut data = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = data.len();
        match rng.below(7) {
            0 if len > 0 => {
                let at = rng.below(len);
                data[at] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let at = rng.below(len);
                data[at] = rng.next() as u8;
            }
            2 => data.truncate(rng.below(len + 1)),
            3 if len > 0 => {
                // A run of bytes again (a record repeated, a length doubled).
                let from = rng.below(len);
                let to = from + rng.below((len - from).min(64) + 1);
                let run = data[from..to].to_vec();
                let at = rng.below(len + 1);
                data.splice(at..at, run);
            }
            4 if len > 0 => {
                let from = rng.below(len);
                let to = from + rng.below(len - from + 1);
                data.drain(from..to);
            }
            5 if !other.is_empty() => {
                // Spliced with another input (records of two journals, say).
                let cut = rng.below(len + 1);
                let from = rng.below(other.len());
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
            }
            _ => {
                let at = rng.below(len + 1);
                let bytes: Vec<u8> = (0..1 + rng.below(8)).map(|_| rng.next() as u8).collect();
                data.splice(at..at, bytes);
            }
        }
    }
    data
}

fn keep(target: &str, data: &[u8], why: &str) -> String {
    let dir = root().join("artifacts").join(target);
    let _ = std::fs::create_dir_all(&dir);
    let hash = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let path = dir.join(format!("{why}-{hash:016x}"));
    let _ = std::fs::write(&path, data);
    path.display().to_string()
}

fn run_target(name: &str, target: fn(&[u8])) -> usize {
    let iterations: usize = std::env::var("CAPSTAN_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    let iterations = if name.ends_with("_stream") {
        (iterations / 10).max(1)
    } else {
        iterations
    };
    let seed: u64 = std::env::var("CAPSTAN_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_cafe);
    let inputs = corpus(name);
    let mut rng = Rng(seed ^ name.len() as u64 ^ 0x9e37_79b9_7f4a_7c15);
    let limit = Duration::from_secs(if name.ends_with("_stream") { 10 } else { 5 });
    let check = |data: &[u8]| {
        let started = Instant::now();
        if std::panic::catch_unwind(|| target(data)).is_err() {
            panic!(
                "{name}: panicked on an input, kept at {}",
                keep(name, data, "crash")
            );
        }
        if started.elapsed() > limit {
            panic!(
                "{name}: took {:?} on an input, kept at {}",
                started.elapsed(),
                keep(name, data, "slow")
            );
        }
    };
    for input in &inputs {
        check(input);
    }
    for _ in 0..iterations {
        let a = &inputs[rng.below(inputs.len())];
        let b = &inputs[rng.below(inputs.len())];
        check(&mutate(&mut rng, a, b));
    }
    inputs.len() + iterations
}

macro_rules! fuzz_test {
    ($test:ident, $name:literal) => {
        #[test]
        fn $test() {
            let target = capstan_fuzz::TARGETS
                .iter()
                .find(|(n, _)| *n == $name)
                .expect("a target")
                .1;
            let runs = run_target($name, target);
            eprintln!("{}: {runs} inputs, no panic, none slow", $name);
        }
    };
}

fuzz_test!(deployment_reader, "deployment");
fuzz_test!(journal_reader, "journal");
fuzz_test!(nix_output_reader, "nix_output");
fuzz_test!(wire_value_readers, "wire_values");
fuzz_test!(provider_fed_garbage, "provider_stream");
fuzz_test!(host_fed_garbage, "host_stream");

#[test]
fn every_target_has_a_corpus_and_a_cargo_fuzz_binary() {
    for (name, _) in capstan_fuzz::TARGETS {
        assert!(
            root()
                .join("fuzz_targets")
                .join(format!("{name}.rs"))
                .exists(),
            "fuzz/fuzz_targets/{name}.rs"
        );
        let cargo = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
        assert!(
            cargo.contains(&format!("name = \"{name}\"")),
            "{name} in fuzz/Cargo.toml"
        );
    }
}

#[test]
fn recorded_traffic_reaches_past_the_handshake() {
    let (to_provider, to_host) = capstan_fuzz::recorded_traffic();
    assert!(
        to_provider.len() > 100 && to_host.len() > 100,
        "{} {}",
        to_provider.len(),
        to_host.len()
    );
    // Replayed to a host, the provider's side answers its handshake: mutations of it reach
    // the reading of handshakes and results, not only the framing.
    assert!(capstan_fuzz::host_handshake_succeeds(&to_host));
}
