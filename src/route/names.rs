//! On-disk names: how an id becomes a file name inside the route (the id
//! itself while it fits the 104-byte socket-path budget, else a SHA-256
//! name). Every implementation on a route must compute
//! this identically, so it follows the Perl rules to the byte.

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The `sun_path` size the budget is computed from on every platform.
pub const SUN_PATH_BUDGET: i64 = 104;

/// Length of a hashed on-disk name (`h-` + 40 hex digits).
pub const HASHED_LEN: i64 = 42;

/// Sidecar suffixes; names ending in these are never peers.
pub const SIDECAR_SUFFIXES: [&str; 5] = [".pid", ".name", ".resume", ".stats", ".suspend"];

/// The longest verbatim on-disk name a route allows (may be negative).
pub fn max_on_disk_name_length(route: &str) -> i64 {
    SUN_PATH_BUDGET - route.chars().count() as i64 - 2
}

/// Maps `id` to its on-disk name under `route`.
pub fn on_disk_name(route: &str, id: &str) -> Result<String> {
    if id.is_empty() {
        return Err(Error::PeerIdRequired);
    }
    let max = max_on_disk_name_length(route);
    let verbatim = id.chars().count() as i64 <= max
        && !id
            .chars()
            .any(|c| (c as u32) < 0x20 || c == '/' || c == '\\')
        && !id.starts_with("h-");
    if verbatim {
        return Ok(id.to_string());
    }
    if HASHED_LEN > max {
        return Err(Error::NameBudget {
            id: id.to_string(),
            max,
            route: route.to_string(),
        });
    }
    Ok(hashed_name(id))
}

/// `h-` + the first 40 hex digits of SHA-256 over the id's bytes.
///
/// Perl hashes characters U+0080..U+00FF as Latin-1 bytes; ids ipcm creates
/// are ASCII (docs/perl-differences.md, non-ascii-ids), where both agree.
pub fn hashed_name(id: &str) -> String {
    let latin1: Option<Vec<u8>> = id.chars().map(|c| u8::try_from(c as u32).ok()).collect();
    let digest = match latin1 {
        Some(bytes) => Sha256::digest(&bytes),
        None => Sha256::digest(id.as_bytes()),
    };
    let mut out = String::with_capacity(42);
    out.push_str("h-");
    for b in &digest[..20] {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Whether a directory entry name can be a peer: not hidden (`.`), not
/// reserved (`_`), not a sidecar and not a file being written (`.pend`,
/// docs/perl-differences.md, pend-files).
pub fn is_peer_candidate(name: &str) -> bool {
    !(name.starts_with('.')
        || name.starts_with('_')
        || name.ends_with(".pend")
        || SIDECAR_SUFFIXES.iter().any(|s| name.ends_with(s)))
}

/// Refuses ids a local client must not register (docs/perl-differences.md,
/// odd-ids and non-ascii-ids).
pub fn check_local_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::IdRequired);
    }
    if id.starts_with('_') {
        return Err(Error::IdUnderscore);
    }
    let unusable = |reason| {
        Err(Error::IdUnusable {
            id: id.to_string(),
            reason,
        })
    };
    if id == "0" {
        return unusable("'0' is treated as false by Perl peers");
    }
    if !id.is_ascii() {
        return unusable("ids must be ASCII so that every implementation hashes them alike");
    }
    if id.starts_with('.') {
        return unusable("an id starting with '.' never appears in peer listings");
    }
    if id.ends_with(".pend") || SIDECAR_SUFFIXES.iter().any(|s| id.ends_with(s)) {
        return unusable("an id ending in a sidecar suffix collides with another client's files");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worked_examples() {
        let r = "/tmp/PerlIPCManager-4242-Ab12Cd";
        assert_eq!(max_on_disk_name_length(r), 71);
        assert_eq!(on_disk_name(r, "worker-1").unwrap(), "worker-1");
        assert_eq!(
            on_disk_name(r, "h-foo").unwrap(),
            "h-39fee57fed8e8f364b6c87d569a8401d73e53c28"
        );
        assert_eq!(
            on_disk_name(r, "a/b").unwrap(),
            "h-c14cddc033f64b9dea80ea675cf280a015e67251"
        );
        let long = format!("svc:{}", "x".repeat(76));
        assert_eq!(
            on_disk_name(r, &long).unwrap(),
            "h-4c01ba0d3db36de50d4756b733759c1f7694f244"
        );
        assert_eq!(
            on_disk_name(r, "tab\there").unwrap(),
            "h-5b8765931ded06ac39c11c47f83f7457636af478"
        );
        assert!(matches!(on_disk_name(r, ""), Err(Error::PeerIdRequired)));
    }

    #[test]
    fn local_id_rules() {
        assert!(check_local_id("worker-1").is_ok());
        assert!(check_local_id("has/slash").is_ok());
        for bad in ["", "_x", "0", ".hidden", "x.pid", "x.stats", "x.pend", "é"] {
            assert!(check_local_id(bad).is_err(), "{bad}");
        }
        assert_eq!(
            check_local_id("_x").unwrap_err().to_string(),
            "'id' may not begin with an underscore"
        );
    }
}
