//! Per-peer message counters: what the core counts as it reads and sends,
//! and what a client writes to its `.stats` file when it disconnects.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Per-peer message counters, as written to `<name>.stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Messages read from each peer.
    #[serde(default)]
    pub read: BTreeMap<String, u64>,
    /// Messages sent to each peer.
    #[serde(default)]
    pub sent: BTreeMap<String, u64>,
}

impl Stats {
    pub(crate) fn bump(map: &mut BTreeMap<String, u64>, peer: &str) {
        Stats::add(map, peer, 1);
    }

    pub(crate) fn add(map: &mut BTreeMap<String, u64>, peer: &str, n: u64) {
        match map.get_mut(peer) {
            Some(c) => *c += n,
            None => {
                map.insert(peer.to_string(), n);
            }
        }
    }
}
