//! Bytes to text, with bounds: encodings (a byte-order mark, or one the mapping names),
//! lines no longer than a limit, and a guard for readers that buffer a record themselves.

use std::io::{self, BufRead, Read};

use encoding_rs::Encoding;
use encoding_rs_io::DecodeReaderBytesBuilder;

use super::Rejection;

/// Decodes `reader` to UTF-8: a UTF-8 or UTF-16 byte-order mark decides when present (and is
/// removed); otherwise `encoding` (e.g. Latin-1) is transcoded, or, when `None`, the bytes
/// pass through unchanged and are checked as UTF-8 by the reader that splits them.
pub fn decode_text<R: Read>(reader: R, encoding: Option<&'static Encoding>) -> impl Read {
    DecodeReaderBytesBuilder::new()
        .encoding(encoding)
        .bom_override(true)
        .build(reader)
}

/// Splits a reader into lines (LF or CRLF, mixed), each at most `max` bytes and valid UTF-8.
/// A longer line is refused as soon as `max` bytes of it have been read, never buffered.
pub struct LineReader<R> {
    inner: R,
    max: usize,
    buf: Vec<u8>,
    line: u64,
    done: bool,
}

impl<R: BufRead> LineReader<R> {
    pub fn new(inner: R, max: usize) -> Self {
        LineReader {
            inner,
            max,
            buf: Vec::new(),
            line: 0,
            done: false,
        }
    }

    /// The number of the line last returned (1-based).
    pub fn line(&self) -> u64 {
        self.line
    }

    /// The next line (its number, and its text without end-of-line bytes), or `None` at the
    /// end of the input.
    pub fn next_line(&mut self) -> Result<Option<(u64, &str)>, Rejection> {
        if self.done {
            return Ok(None);
        }
        self.buf.clear();
        self.line += 1;
        loop {
            let available = match self.inner.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Rejection::io(format!("line {}", self.line), &e)),
            };
            if available.is_empty() {
                self.done = true;
                if self.buf.is_empty() {
                    return Ok(None);
                }
                break;
            }
            let (take, found) = match available.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (available.len(), false),
            };
            if self.buf.len() + take > self.max + 2 {
                return Err(Rejection::new(
                    format!("line {}", self.line),
                    format!("the line is longer than {} bytes", self.max),
                ));
            }
            self.buf.extend_from_slice(&available[..take]);
            self.inner.consume(take);
            if found {
                break;
            }
        }
        while matches!(self.buf.last(), Some(b'\n' | b'\r')) {
            self.buf.pop();
        }
        let line = self.line;
        std::str::from_utf8(&self.buf)
            .map(|s| Some((line, s)))
            .map_err(|e| {
                Rejection::new(
                    format!("line {}", self.line),
                    format!(
                        "not valid UTF-8 at byte {} (name the file's encoding)",
                        e.valid_up_to() + 1
                    ),
                )
            })
    }
}

/// Fails the read once more than `max` bytes pass without one of the `resets` bytes: a guard
/// for readers (csv, quick-xml) that would otherwise grow a buffer for one endless record.
pub struct Guard<R> {
    inner: R,
    max: usize,
    run: usize,
    resets: &'static [u8],
}

impl<R: Read> Guard<R> {
    pub fn new(inner: R, max: usize, resets: &'static [u8]) -> Self {
        Guard {
            inner,
            max,
            run: 0,
            resets,
        }
    }
}

impl<R: Read> Read for Guard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        for &b in &buf[..n] {
            if self.resets.contains(&b) {
                self.run = 0;
            } else {
                self.run += 1;
                if self.run > self.max {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("a line or element is longer than {} bytes", self.max),
                    ));
                }
            }
        }
        Ok(n)
    }
}
