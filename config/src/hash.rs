//! The stable hashes that configured behaviour rests on: `sticky_header` keys map to
//! variants through them, and `sampling: hash` shadows choose request ids with them.
//! They must give the same answer in every process, version and machine (a change
//! would move sticky users and change which requests are mirrored), so they are fixed
//! here, once, rather than taken from `std`'s randomly keyed hasher.

/// SplitMix64's output function: a strong 64-bit mixer.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a over the bytes, then [`mix`], so that inputs differing in their last byte
/// (`req-1`, `req-2`) land far apart.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    mix(h)
}
