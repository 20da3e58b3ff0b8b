//! Hash maps keyed by resource address.
//!
//! Deployments and states hold one entry per resource, looked up several times per operation.
//! Ordered maps of `String` cost a string comparison per tree level on every lookup and move
//! large values around on insert; these are hashed (FNV) and keep their entries in a vector,
//! sorted by address once after loading so listings stay in address order.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

/// FNV-1a: the engine hashes short addresses, where SipHash's DoS resistance buys nothing (the
/// keys come from the user's own deployment and state) and costs a third of the time.
#[derive(Default, Clone, Copy)]
pub struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut hash = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for byte in bytes {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = hash;
    }
}

/// A hash map with FNV.
pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<Fnv>>;

/// A hash set with FNV.
pub type FastSet<K> = std::collections::HashSet<K, BuildHasherDefault<Fnv>>;

/// Resources by address, in insertion order (address order after loading).
pub type AddressMap<V> = indexmap::IndexMap<String, V, BuildHasherDefault<Fnv>>;
