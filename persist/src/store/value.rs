//! Values of the `logs` column family: a line is its stream byte ‖ its content, the byte's
//! `PARTIAL` bit set when no newline followed the content; a gap marker (lines lost at that
//! place) is `GAP | stream` ‖ the number of lines (8 bytes, big-endian) ‖ why (UTF-8).

use joblet_ipc::Stream;

/// Set in the first byte of a gap marker (stream values are 0 to 2).
const GAP: u8 = 0x80;
/// Set in the first byte of a line no newline followed.
const PARTIAL: u8 = 0x40;

/// Lines lost at one place of a job's log, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap<'a> {
    pub lines: u64,
    pub reason: &'a str,
}

/// A stored log value, borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogValue<'a> {
    pub stream: Stream,
    pub content: &'a [u8],
    pub partial: bool,
    pub gap: Option<Gap<'a>>,
}

/// Writes a line's value into `value` (cleared first).
pub fn encode_line(value: &mut Vec<u8>, stream: Stream, content: &[u8], partial: bool) {
    value.clear();
    value.push(stream as u8 | if partial { PARTIAL } else { 0 });
    value.extend_from_slice(content);
}

/// Writes a gap marker's value into `value` (cleared first).
pub fn encode_gap(value: &mut Vec<u8>, stream: Stream, lines: u64, reason: &str) {
    value.clear();
    value.push(GAP | stream as u8);
    value.extend_from_slice(&lines.to_be_bytes());
    value.extend_from_slice(reason.as_bytes());
}

/// Reads a log value; `None` for bytes that are not one.
pub fn parse_log_value(value: &[u8]) -> Option<LogValue<'_>> {
    let (&first, rest) = value.split_first()?;
    let stream = Stream::try_from(i32::from(first & !(GAP | PARTIAL))).ok()?;
    if first & GAP == 0 {
        return Some(LogValue {
            stream,
            content: rest,
            partial: first & PARTIAL != 0,
            gap: None,
        });
    }
    let (lines, reason) = rest.split_first_chunk::<8>()?;
    Some(LogValue {
        stream,
        content: &[],
        partial: false,
        gap: Some(Gap {
            lines: u64::from_be_bytes(*lines),
            reason: std::str::from_utf8(reason).unwrap_or("(reason not UTF-8)"),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_gaps_read_back_as_written() {
        let line = [Stream::Stderr as u8, b'h', b'i'];
        let read = parse_log_value(&line).unwrap();
        assert_eq!(
            (read.stream, read.content, read.gap),
            (Stream::Stderr, &b"hi"[..], None)
        );
        let mut value = Vec::new();
        encode_gap(&mut value, Stream::Stdout, 3, "too large");
        let read = parse_log_value(&value).unwrap();
        assert_eq!(read.stream, Stream::Stdout);
        assert_eq!(
            read.gap,
            Some(Gap {
                lines: 3,
                reason: "too large"
            })
        );
        assert!(parse_log_value(&[]).is_none());
        assert!(parse_log_value(&[7, b'x']).is_none());
        assert!(parse_log_value(&[GAP | 1, 0, 0]).is_none());
    }
}
