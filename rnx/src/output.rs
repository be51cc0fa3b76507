//! Writing to stdout: a closed pipe (`rnx job log ID | head`) ends rnx quietly.

use std::io::Write;

use crate::Failure;

const BROKEN_PIPE: &str = "broken pipe";

pub fn is_broken_pipe(failure: &Failure) -> bool {
    matches!(failure, Failure::Usage(message) if message == BROKEN_PIPE)
}

pub fn write(out: &mut impl Write, bytes: &[u8]) -> Result<(), Failure> {
    out.write_all(bytes).map_err(io_failure)
}

pub fn flush(out: &mut impl Write) -> Result<(), Failure> {
    out.flush().map_err(io_failure)
}

fn io_failure(error: std::io::Error) -> Failure {
    if error.kind() == std::io::ErrorKind::BrokenPipe {
        Failure::Usage(BROKEN_PIPE.into())
    } else {
        Failure::Usage(format!("write to stdout: {error}"))
    }
}

/// Prints one JSON value as a line.
pub fn json_line(out: &mut impl Write, value: &serde_json::Value) -> Result<(), Failure> {
    let mut line = value.to_string().into_bytes();
    line.push(b'\n');
    write(out, &line)
}

/// Bytes as 1.5 KiB / 3.2 MiB.
pub fn human_bytes(bytes: i64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value.abs() >= 1024.0 && unit < units.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

/// The terminal's width in columns when stdout is one (rows are cut to it), else `None` (pipes
/// get whole rows).
pub fn terminal_width() -> Option<usize> {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        return None;
    }
    terminal_size::terminal_size().map(|(terminal_size::Width(columns), _)| usize::from(columns))
}

/// `row` cut to `width` characters, the cut marked with `…`.
pub fn fit(row: &str, width: Option<usize>) -> String {
    match width {
        Some(width) if row.chars().count() > width => {
            let mut cut: String = row.chars().take(width.saturating_sub(1)).collect();
            cut.push('…');
            cut
        }
        _ => row.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_cut_to_the_width_with_an_ellipsis() {
        assert_eq!(fit("abcdef", Some(4)), "abc…");
        assert_eq!(fit("abcd", Some(4)), "abcd");
        assert_eq!(fit("äöüß€x", Some(5)), "äöüß…");
        assert_eq!(fit("abcdef", None), "abcdef");
    }
}
