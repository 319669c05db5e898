//! The pure model everything else is built on: what should exist for a RayCluster ([`desired`]),
//! Ray's resource vocabulary ([`resources`]) and the slice of the observed world the operator
//! decides from ([`observed`]). No I/O, no clock, no imports from any other module of the crate
//! but [`crate::api`].

pub mod desired;
pub mod observed;
pub mod resources;

/// Short stable hash of a text (the first 8 bytes of its SHA-256, in hex): the `ray-launch-config`
/// label of pods and of the head Service.
pub fn short_hash(text: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(text.as_bytes()).iter().take(8).map(|b| format!("{b:02x}")).collect()
}
