//! Which partition a key belongs to. A key's events,
//! its state changes in the changelog and its writes all go to the partition
//! Kafka's default partitioner (murmur2, as in the Java client and librdkafka's
//! `murmur2_random`) picks for the key id, so the node that consumes that
//! partition of the events topic is the one node that writes the key.

/// Kafka's murmur2, bit for bit as `org.apache.kafka.common.utils.Utils.murmur2`.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= (tail[2] as u32) << 16;
    }
    if tail.len() >= 2 {
        h ^= (tail[1] as u32) << 8;
    }
    if !tail.is_empty() {
        h ^= tail[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition of `partitions` that a key id belongs to.
pub fn partition_of(key_id: &str, partitions: i32) -> i32 {
    (murmur2(key_id.as_bytes()) & 0x7fff_ffff) % partitions.max(1)
}

/// librdkafka's name for the same partitioner: every keywarden producer of
/// events uses it, and so must every other producer of a multi-node setup.
pub const PARTITIONER: &str = "murmur2_random";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafkas_reference_values() {
        // The cases of Kafka's own UtilsTest.
        let cases: &[(&[u8], i32)] = &[
            (b"21", -973932308),
            (b"foobar", -790332482),
            (b"a-little-bit-long-string", -985981536),
            (b"a-little-bit-longer-string", -1486304829),
            (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
            (b"abc", 479470107),
        ];
        for (input, want) in cases {
            assert_eq!(murmur2(input), *want, "{}", String::from_utf8_lossy(input));
        }
        assert!((0..1000).all(|i| (0..12).contains(&partition_of(&format!("key-{i}"), 12))));
    }
}
