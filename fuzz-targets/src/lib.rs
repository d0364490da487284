//! The bodies of the fuzz targets, one function per target, each `fn(&[u8])` that panics
//! when an invariant breaks. `fuzz/fuzz_targets/*.rs` hand them to libFuzzer (nightly,
//! `cargo fuzz run NAME`); `tests/corpus.rs` replays the committed corpus through them
//! on stable, in the normal suite. Inputs are raw bytes cut into chunks by [`chunks`]
//! where a target needs several values, so that libFuzzer's mutations stay meaningful.

mod auth;
mod command;
mod events;
mod paging;

pub use auth::{auth_header, tokens_file, KNOWN_TOKEN};
pub use command::command;
pub use events::{as_of_history, envelope};
pub use paging::page_token;

/// A target: panics when an invariant breaks on this input.
pub type Target = fn(&[u8]);

/// Every target by name (the name of its `fuzz/fuzz_targets/*.rs` and corpus folder).
pub const TARGETS: &[(&str, Target)] = &[
    ("command", command),
    ("envelope", envelope),
    ("as_of_history", as_of_history),
    ("page_token", page_token),
    ("auth_header", auth_header),
    ("tokens_file", tokens_file),
];

/// Splits an input into `(tag, body)` chunks: a tag byte, a little-endian `u16` length,
/// then that many bytes (fewer at the end of the input).
pub fn chunks(mut data: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        let (&tag, rest) = data.split_first()?;
        let (len, rest) = match rest {
            [a, b, rest @ ..] => (usize::from(u16::from_le_bytes([*a, *b])), rest),
            _ => (rest.len(), rest),
        };
        let (body, rest) = rest.split_at(len.min(rest.len()));
        data = rest;
        Some((tag, body))
    })
}

/// One chunk in the form [`chunks`] reads (for seeds).
pub fn chunk(tag: u8, body: &[u8]) -> Vec<u8> {
    let len = u16::try_from(body.len()).expect("seed chunks are short");
    let mut out = vec![tag];
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_round_trip_and_tolerate_truncation() {
        let mut data = chunk(3, b"abc");
        data.extend(chunk(7, b""));
        data.extend(chunk(9, b"xyz"));
        let read: Vec<(u8, &[u8])> = chunks(&data).collect();
        assert_eq!(read, [(3, &b"abc"[..]), (7, &b""[..]), (9, &b"xyz"[..])]);
        let cut = &data[..data.len() - 1];
        assert_eq!(chunks(cut).last(), Some((9, &b"xy"[..])));
        assert_eq!(chunks(&[5]).collect::<Vec<_>>(), [(5, &b""[..])]);
        assert_eq!(chunks(&[5, 1]).collect::<Vec<_>>(), [(5, &[1u8][..])]);
    }
}
