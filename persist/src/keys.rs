//! Key encoding for the log and metric column families.
//!
//! A key is `job_id ‖ 0x00 ‖ timestamp ‖ sequence`, the timestamp as 8 big-endian bytes with the
//! sign bit flipped (so negative times sort first) and the sequence as 8 big-endian bytes.
//! Byte-wise order of keys is therefore the order of (job_id, timestamp, sequence) for any job
//! id without NUL bytes (which the store refuses): all records of a job are contiguous, and a
//! time range of one job is one seek plus a forward scan.

pub const SEPARATOR: u8 = 0;
const SUFFIX_BYTES: usize = 16;

pub fn encode(job_id: &str, timestamp_ns: i64, sequence: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(job_id.len() + 1 + SUFFIX_BYTES);
    encode_into(&mut key, job_id, timestamp_ns, sequence);
    key
}

/// Like [`encode`], reusing `key`'s allocation.
pub fn encode_into(key: &mut Vec<u8>, job_id: &str, timestamp_ns: i64, sequence: u64) {
    key.clear();
    key.extend_from_slice(job_id.as_bytes());
    key.push(SEPARATOR);
    key.extend_from_slice(&sortable_timestamp(timestamp_ns));
    key.extend_from_slice(&sequence.to_be_bytes());
}

/// The smallest key of `job_id` at or after `timestamp_ns`.
pub fn lower_bound(job_id: &str, timestamp_ns: i64) -> Vec<u8> {
    encode(job_id, timestamp_ns, 0)
}

/// The first key after every key of `job_id` (an exclusive upper bound for the whole job).
pub fn job_end(job_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(job_id.len() + 1);
    key.extend_from_slice(job_id.as_bytes());
    key.push(SEPARATOR + 1);
    key
}

/// The first key of `job_id` (an inclusive lower bound for the whole job).
pub fn job_start(job_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(job_id.len() + 1);
    key.extend_from_slice(job_id.as_bytes());
    key.push(SEPARATOR);
    key
}

/// Splits a key into (job_id, timestamp, sequence); `None` for bytes that are not a key.
pub fn decode(key: &[u8]) -> Option<(&str, i64, u64)> {
    let split = key.len().checked_sub(SUFFIX_BYTES + 1)?;
    if key[split] != SEPARATOR {
        return None;
    }
    let job_id = std::str::from_utf8(&key[..split]).ok()?;
    let timestamp: [u8; 8] = key[split + 1..split + 9].try_into().ok()?;
    let sequence: [u8; 8] = key[split + 9..].try_into().ok()?;
    Some((
        job_id,
        (u64::from_be_bytes(timestamp) ^ SIGN_BIT) as i64,
        u64::from_be_bytes(sequence),
    ))
}

/// The timestamp of a key, read from its fixed-size suffix.
pub fn timestamp_of(key: &[u8]) -> Option<i64> {
    decode(key).map(|(_, timestamp, _)| timestamp)
}

const SIGN_BIT: u64 = 1 << 63;

fn sortable_timestamp(timestamp_ns: i64) -> [u8; 8] {
    ((timestamp_ns as u64) ^ SIGN_BIT).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn job_id() -> impl Strategy<Value = String> {
        // Any text without NUL, including prefixes of one another and non-ASCII.
        prop_oneof![
            "[a-c]{0,4}",
            "[\\x01-\\x7f]{1,8}",
            "[a-z0-9-]{36}",
            "\\PC{1,6}"
        ]
        .prop_filter("no NUL", |s| !s.contains('\0'))
    }

    proptest! {
        #[test]
        fn byte_order_is_job_then_time_then_sequence(
            a in (job_id(), any::<i64>(), any::<u64>()),
            b in (job_id(), any::<i64>(), any::<u64>()),
        ) {
            let key_a = encode(&a.0, a.1, a.2);
            let key_b = encode(&b.0, b.1, b.2);
            let tuple_a = (a.0.as_bytes(), a.1, a.2);
            let tuple_b = (b.0.as_bytes(), b.1, b.2);
            prop_assert_eq!(key_a.cmp(&key_b), tuple_a.cmp(&tuple_b));
        }

        #[test]
        fn decode_inverts_encode(job in job_id(), timestamp in any::<i64>(), sequence in any::<u64>()) {
            let key = encode(&job, timestamp, sequence);
            prop_assert_eq!(decode(&key), Some((job.as_str(), timestamp, sequence)));
        }

        #[test]
        fn job_bounds_enclose_exactly_the_job(
            job in job_id(), other in job_id(), timestamp in any::<i64>(), sequence in any::<u64>()
        ) {
            let key = encode(&other, timestamp, sequence);
            let inside = job_start(&job) <= key && key < job_end(&job);
            prop_assert_eq!(inside, job == other);
        }
    }
}
