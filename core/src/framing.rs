//! Following an HTTP/1 client's request framing on the raw bytes, to find a
//! request head that carries both `Content-Length` and `Transfer-Encoding`.
//!
//! RFC 9112 §6.3 says such a request "ought to be handled as an error"; Weft
//! answers 400 `ambiguous-request` ([`crate::screen`]). hyper frames it by its
//! chunked coding and removes the `Content-Length` before the service sees
//! the request (it also closes the connection after the response), so the
//! evidence is gone by then and no builder option keeps it. The server's IO
//! wrapper therefore feeds every read of a connection to a [`RequestFraming`],
//! which follows request heads and bodies as hyper does and returns the
//! ordinal (1 for the connection's first request) of the first head with
//! both fields. hyper hands an HTTP/1 connection's requests to the service one
//! by one, in order, so the server marks its request of that ordinal with
//! [`BothLengths`].
//!
//! It must never claim a head that hyper did not parse as that request, so it
//! follows exactly the syntax hyper accepts, and stops (makes no claim for
//! the rest of the connection) wherever that would take more:
//! - heads: empty lines before the request line are skipped (httparse does),
//!   lines end with LF or CRLF, an empty line ends the head; field names
//!   match case-insensitively and only at the start of a line, followed at
//!   once by `:` (hyper refuses whitespace before the colon and obs-fold);
//! - bodies: `Transfer-Encoding` means chunked (hyper refuses a request whose
//!   last coding is not), else `Content-Length` is skipped by count (its value
//!   read as hyper reads it; one it cannot read stops the tracking), else
//!   there is none. Chunked bodies follow hyper's decoder state by state:
//!   hex size, whitespace, extensions up to CR, CRLF, data by count, CRLF,
//!   and after the last chunk trailer lines up to an empty line;
//! - it stops at a byte where hyper's parser fails (hyper refuses the request
//!   and closes), after a head with `Upgrade` or a `CONNECT` (the connection
//!   may leave HTTP/1), at the HTTP/2 preface, and after the first head with
//!   both fields (hyper closes the connection after that request).
//!
//! Body bytes are skipped by count, never scanned for heads, so a body that
//! looks like a request head is never mistaken for one.

/// Marks a request whose head carried both `Content-Length` and
/// `Transfer-Encoding` (a request extension the server adds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BothLengths;

/// One HTTP/1 connection's request framing, fed the bytes the server reads.
#[derive(Debug, Clone, Default)]
pub struct RequestFraming {
    state: State,
    /// Request heads begun so far.
    heads: u64,
    /// What the current head has shown.
    head: Head,
}

#[derive(Debug, Clone, Copy, Default)]
struct Head {
    content_length: Length,
    transfer_encoding: bool,
    /// `Upgrade`, `CONNECT` or the HTTP/2 preface: what follows the head
    /// may not be HTTP/1.
    leaves_http1: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Length {
    #[default]
    Absent,
    Value(u64),
    /// A value hyper would refuse, or several differing ones.
    Unreadable,
}

#[derive(Debug, Clone, Copy, Default)]
enum State {
    /// Before a request line.
    #[default]
    Idle,
    /// CR of an empty line before a request line.
    IdleCr,
    /// The request line's method: its first bytes (enough for `CONNECT`).
    Method {
        seen: [u8; 8],
        len: u8,
    },
    /// The rest of a line that does not matter.
    Line,
    /// At the start of a header line (or the empty line ending the head).
    LineStart,
    /// CR at the start of a header line: the head ends at its LF.
    LineStartCr,
    /// In a header name that may be `field`: `matched` bytes matched.
    Name {
        field: Field,
        matched: u8,
    },
    /// In a `Content-Length` value.
    LengthValue {
        value: u64,
        digits: bool,
        after: bool,
    },
    /// In a `Content-Length` body: bytes left.
    Body(u64),
    Chunked(Chunk),
    /// No more claims on this connection.
    Done,
}

/// hyper's chunked decoder states (hyper `proto::h1::decode::ChunkedState`),
/// with the chunk size where hyper keeps it.
#[derive(Debug, Clone, Copy)]
enum Chunk {
    Start,
    Size(u64),
    SizeLws(u64),
    Extension(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    Trailer,
    TrailerLf,
    EndCr,
    EndLf,
}

#[derive(Debug, Clone, Copy)]
enum Field {
    ContentLength,
    TransferEncoding,
    Upgrade,
}

impl Field {
    /// The field name, lower case, with its colon.
    fn name(self) -> &'static [u8] {
        match self {
            Field::ContentLength => b"content-length:",
            Field::TransferEncoding => b"transfer-encoding:",
            Field::Upgrade => b"upgrade:",
        }
    }
}

impl RequestFraming {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether it still follows the connection (false once it has stopped:
    /// nothing more will be claimed).
    pub fn is_following(&self) -> bool {
        !matches!(self.state, State::Done)
    }

    /// Follows `bytes`, the next bytes read from the client; returns the
    /// ordinal of a request head they complete that carried both
    /// `Content-Length` and `Transfer-Encoding` (at most one per connection).
    pub fn feed(&mut self, mut bytes: &[u8]) -> Option<u64> {
        while let Some((&byte, rest)) = bytes.split_first() {
            match &mut self.state {
                State::Done => return None,
                State::Line => {
                    // Whole lines that cannot matter are skipped here, not
                    // stepped into.
                    loop {
                        let at = find_lf(bytes)?;
                        bytes = bytes.get(at + 1..).unwrap_or_default();
                        match bytes.first() {
                            Some(b) if !may_matter(*b) => {}
                            _ => break,
                        }
                    }
                    self.state = State::LineStart;
                }
                State::LineStart if bytes.starts_with(b"\r\n") => {
                    bytes = bytes.get(2..).unwrap_or_default();
                    if let Some(ordinal) = self.end_of_head() {
                        return Some(ordinal);
                    }
                }
                // A method that is all here is read at once, as `step` would.
                State::Idle if !matches!(byte, b'\r' | b'\n') => {
                    bytes = match self.method(bytes) {
                        Some(after) => after,
                        None => {
                            self.step(byte);
                            rest
                        }
                    };
                }
                State::Body(left) => {
                    skip(&mut bytes, left);
                    if *left == 0 {
                        self.state = State::Idle;
                    }
                }
                State::Chunked(Chunk::Data(left)) => {
                    skip(&mut bytes, left);
                    if *left == 0 {
                        self.state = State::Chunked(Chunk::DataCr);
                    }
                }
                _ => {
                    bytes = rest;
                    if let Some(ordinal) = self.step(byte) {
                        return Some(ordinal);
                    }
                }
            }
        }
        None
    }

    /// A request line starting `bytes` whose method (at most 8 bytes, like
    /// [`State::Method`]) ends within them: what follows its end.
    fn method<'a>(&mut self, bytes: &'a [u8]) -> Option<&'a [u8]> {
        // The first byte belongs to the method whatever it is.
        let end = 1 + bytes
            .get(1..)?
            .iter()
            .take(8)
            .position(|&b| matches!(b, b' ' | b'\r' | b'\n'))?;
        let (method, after) = bytes.split_at(end);
        self.heads += 1;
        self.head = Head::default();
        self.state = if after.first() == Some(&b' ') {
            if method == b"CONNECT" || method == b"PRI" {
                self.head.leaves_http1 = true;
            }
            State::Line
        } else {
            // A request line without a target: hyper refuses it.
            State::Done
        };
        after.get(1..)
    }

    /// One byte outside the fast paths of [`Self::feed`].
    fn step(&mut self, byte: u8) -> Option<u64> {
        self.state = match self.state {
            State::Idle => match byte {
                b'\n' => State::Idle,
                b'\r' => State::IdleCr,
                _ => {
                    self.heads += 1;
                    self.head = Head::default();
                    let mut seen = [0; 8];
                    seen[0] = byte;
                    State::Method { seen, len: 1 }
                }
            },
            State::IdleCr => match byte {
                b'\n' => State::Idle,
                _ => State::Done,
            },
            State::Method { mut seen, len } => match byte {
                b' ' => {
                    let method = seen.get(..usize::from(len)).unwrap_or_default();
                    if method == b"CONNECT" || method == b"PRI" {
                        self.head.leaves_http1 = true;
                    }
                    State::Line
                }
                // A request line without a target: hyper refuses it.
                b'\r' | b'\n' => State::Done,
                _ => {
                    if let Some(slot) = seen.get_mut(usize::from(len)) {
                        *slot = byte;
                    }
                    State::Method {
                        seen,
                        len: len.saturating_add(1).min(8),
                    }
                }
            },
            State::LineStart => match byte {
                b'\n' => return self.end_of_head(),
                b'\r' => State::LineStartCr,
                _ => match byte.to_ascii_lowercase() {
                    b'c' => State::Name {
                        field: Field::ContentLength,
                        matched: 1,
                    },
                    b't' => State::Name {
                        field: Field::TransferEncoding,
                        matched: 1,
                    },
                    b'u' => State::Name {
                        field: Field::Upgrade,
                        matched: 1,
                    },
                    _ => State::Line,
                },
            },
            State::LineStartCr => match byte {
                b'\n' => return self.end_of_head(),
                _ => State::Done,
            },
            State::Name { field, matched } => {
                let name = field.name();
                if name.get(usize::from(matched)) == Some(&byte.to_ascii_lowercase()) {
                    let matched = matched + 1;
                    if usize::from(matched) < name.len() {
                        State::Name { field, matched }
                    } else {
                        self.field(field)
                    }
                } else if byte == b'\n' {
                    State::LineStart
                } else {
                    State::Line
                }
            }
            State::LengthValue {
                value,
                digits,
                after,
            } => match byte {
                b'0'..=b'9' if !after => match value
                    .checked_mul(10)
                    .and_then(|v| v.checked_add(u64::from(byte - b'0')))
                {
                    Some(value) => State::LengthValue {
                        value,
                        digits: true,
                        after,
                    },
                    None => self.unreadable_length(),
                },
                b' ' | b'\t' | b'\r' => State::LengthValue {
                    value,
                    digits,
                    after: after || digits || byte == b'\r',
                },
                b'\n' if digits => {
                    self.head.content_length = match self.head.content_length {
                        Length::Absent => Length::Value(value),
                        Length::Value(v) if v == value => Length::Value(value),
                        _ => Length::Unreadable,
                    };
                    State::LineStart
                }
                b'\n' => {
                    self.head.content_length = Length::Unreadable;
                    State::LineStart
                }
                _ => self.unreadable_length(),
            },
            State::Chunked(chunk) => self.chunk(chunk, byte),
            // Handled in `feed`.
            State::Line | State::Body(_) | State::Done => self.state,
        };
        None
    }

    /// A header line's name matched `field` (with its colon).
    fn field(&mut self, field: Field) -> State {
        match field {
            // Every way out of the value records the field (a value hyper
            // never reads, after a Transfer-Encoding, still counts).
            Field::ContentLength => State::LengthValue {
                value: 0,
                digits: false,
                after: false,
            },
            Field::TransferEncoding => {
                self.head.transfer_encoding = true;
                State::Line
            }
            Field::Upgrade => {
                self.head.leaves_http1 = true;
                State::Line
            }
        }
    }

    fn unreadable_length(&mut self) -> State {
        self.head.content_length = Length::Unreadable;
        State::Line
    }

    /// The empty line ending a head: what follows it.
    fn end_of_head(&mut self) -> Option<u64> {
        let head = std::mem::take(&mut self.head);
        if head.transfer_encoding && head.content_length != Length::Absent {
            self.state = State::Done;
            return Some(self.heads);
        }
        self.state = if head.leaves_http1 {
            State::Done
        } else if head.transfer_encoding {
            State::Chunked(Chunk::Start)
        } else {
            match head.content_length {
                Length::Absent | Length::Value(0) => State::Idle,
                Length::Value(n) => State::Body(n),
                Length::Unreadable => State::Done,
            }
        };
        None
    }

    /// hyper's chunked decoder, one byte (data is skipped in [`Self::feed`]).
    fn chunk(&self, chunk: Chunk, byte: u8) -> State {
        let next = match chunk {
            Chunk::Start => hex(byte).map(|d| Chunk::Size(u64::from(d))),
            Chunk::Size(size) => match byte {
                b'\t' | b' ' => Some(Chunk::SizeLws(size)),
                b';' => Some(Chunk::Extension(size)),
                b'\r' => Some(Chunk::SizeLf(size)),
                _ => hex(byte).and_then(|d| {
                    size.checked_mul(16)
                        .and_then(|s| s.checked_add(u64::from(d)))
                        .map(Chunk::Size)
                }),
            },
            Chunk::SizeLws(size) => match byte {
                b'\t' | b' ' => Some(Chunk::SizeLws(size)),
                b';' => Some(Chunk::Extension(size)),
                b'\r' => Some(Chunk::SizeLf(size)),
                _ => None,
            },
            Chunk::Extension(size) => match byte {
                b'\r' => Some(Chunk::SizeLf(size)),
                b'\n' => None,
                _ => Some(Chunk::Extension(size)),
            },
            Chunk::SizeLf(size) => match (byte, size) {
                (b'\n', 0) => Some(Chunk::EndCr),
                (b'\n', size) => Some(Chunk::Data(size)),
                _ => None,
            },
            Chunk::DataCr => (byte == b'\r').then_some(Chunk::DataLf),
            Chunk::DataLf => (byte == b'\n').then_some(Chunk::Start),
            Chunk::Trailer => Some(if byte == b'\r' {
                Chunk::TrailerLf
            } else {
                Chunk::Trailer
            }),
            Chunk::TrailerLf => (byte == b'\n').then_some(Chunk::EndCr),
            Chunk::EndCr => Some(if byte == b'\r' {
                Chunk::EndLf
            } else {
                Chunk::Trailer
            }),
            Chunk::EndLf => {
                return if byte == b'\n' {
                    State::Idle
                } else {
                    State::Done
                };
            }
            // Skipped in `feed`.
            Chunk::Data(size) => Some(Chunk::Data(size)),
        };
        next.map_or(State::Done, State::Chunked)
    }
}

fn hex(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

/// Whether a header line starting with `byte` may matter: the head's end, or
/// one of the [`Field`]s (any other line is skipped whole).
fn may_matter(byte: u8) -> bool {
    matches!(
        byte.to_ascii_lowercase(),
        b'\r' | b'\n' | b'c' | b't' | b'u'
    )
}

/// Where the first LF in `bytes` is, eight bytes at a time.
fn find_lf(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_le_bytes([0x80; 8]);
    const LFS: u64 = u64::from_le_bytes([b'\n'; 8]);
    let mut at = 0;
    let mut rest = bytes;
    while let Some((word, after)) = rest.split_first_chunk::<8>() {
        // A zero byte in `x` is an LF; the lowest flagged byte is exact
        // (borrows only flag bytes above a zero).
        let x = u64::from_le_bytes(*word) ^ LFS;
        let zeros = x.wrapping_sub(ONES) & !x & HIGHS;
        if zeros != 0 {
            return Some(at + (zeros.trailing_zeros() / 8) as usize);
        }
        at += 8;
        rest = after;
    }
    rest.iter().position(|&b| b == b'\n').map(|i| at + i)
}

/// Skips up to `left` bytes of `bytes`, counting them off `left`.
fn skip(bytes: &mut &[u8], left: &mut u64) {
    let n = usize::try_from(*left)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    *bytes = bytes.get(n..).unwrap_or_default();
    *left -= n as u64;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The claim (if any) and whether it still follows, fed `input` in
    /// pieces cut at `cuts`.
    fn fed(input: &[u8], cuts: &[usize]) -> (Option<u64>, bool) {
        let mut framing = RequestFraming::new();
        let mut claim = None;
        let mut from = 0;
        for &to in cuts.iter().chain([input.len()].iter()) {
            if let Some(k) = framing.feed(input.get(from..to).unwrap_or_default()) {
                assert!(claim.is_none(), "two claims");
                claim = Some(k);
            }
            from = to;
        }
        (claim, framing.is_following())
    }

    /// [`fed`] whole, checked against every two-piece cut and byte by byte.
    fn follow(input: &str) -> (Option<u64>, bool) {
        let input = input.as_bytes();
        let whole = fed(input, &[]);
        for cut in 0..=input.len() {
            assert_eq!(fed(input, &[cut]), whole, "cut at {cut}: {input:?}");
        }
        let every: Vec<usize> = (1..input.len()).collect();
        assert_eq!(fed(input, &every), whole, "byte by byte");
        whole
    }

    const GET: &str = "GET /a HTTP/1.1\r\nHost: b\r\n\r\n";

    #[test]
    fn plain_requests_are_followed_without_a_claim() {
        assert_eq!(follow(GET), (None, true));
        let three = format!("{GET}{GET}{GET}");
        assert_eq!(follow(&three), (None, true));
        // LF line ends, and the empty lines httparse skips before a request.
        assert_eq!(follow("\r\n\nGET / HTTP/1.1\nHost: b\n\n"), (None, true));
    }

    #[test]
    fn both_fields_are_claimed_in_either_order_and_any_case() {
        for head in [
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length:5\r\ntransfer-encoding:chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTRANSFER-ENCODING: chunked\r\nCONTENT-LENGTH: x\r\n\r\n",
            "POST / HTTP/1.1\nHost: b\nTransfer-Encoding: chunked\nContent-Length:\n\n",
        ] {
            assert_eq!(follow(head), (Some(1), false), "{head}");
        }
    }

    #[test]
    fn the_claim_names_the_request_of_a_pipelined_sequence() {
        let seq = format!(
            "{GET}\
             POST /cl HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc\
             POST /chunked HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
             3;name=value;x\r\nabc\r\n10 \t;ext\r\n0123456789abcdef\r\n0\r\nTrailer-A: 1\r\nT: 2\r\n\r\n\
             POST /both HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n\
             {GET}"
        );
        assert_eq!(follow(&seq), (Some(4), false));
    }

    #[test]
    fn body_bytes_that_look_like_heads_are_skipped() {
        let fake = "GET /x HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        let cl = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n{fake}{GET}",
            fake.len()
        );
        assert_eq!(follow(&cl), (None, true));
        let chunked = format!(
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{fake}\r\n0\r\n\r\n{GET}",
            fake.len()
        );
        assert_eq!(follow(&chunked), (None, true));
        // A field that starts like one of them is another field.
        let lookalikes = "GET / HTTP/1.1\r\nContent-Type: a\r\nTE: trailers\r\nUpgrade-Insecure-Requests: 1\r\nX-Content-Length: 5\r\nTransfer-Encodings: chunked\r\n\r\n";
        assert_eq!(follow(&format!("{lookalikes}{GET}")), (None, true));
        // The ordinal counts what came before the body.
        let then = format!(
            "{cl}POST / HTTP/1.1\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        assert_eq!(follow(&then), (Some(3), false));
    }

    #[test]
    fn it_stops_where_hyper_would_refuse_or_leave_http1() {
        let both = "POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        for before in [
            // hyper refuses these: nothing after them is served.
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            "POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\na",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\nx\r\n0\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1;a\nx\r\n0\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nxy\r\n0\r\n\r\n",
            "\rGET / HTTP/1.1\r\n\r\n",
            "GET\r\n\r\n",
            "GET / HTTP/1.1\r\n\rX\r\n\r\n",
            // The connection may leave HTTP/1.
            "GET / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            assert_eq!(
                follow(&format!("{before}{both}")),
                (None, false),
                "{before}"
            );
        }
        // A head with both is still claimed when it also upgrades.
        let upgrade = "GET / HTTP/1.1\r\nUpgrade: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(follow(upgrade), (Some(1), false));
    }

    #[test]
    fn chunk_sizes_and_trailers_follow_hypers_decoder() {
        for body in [
            "0\r\n\r\n",
            "000\r\n\r\n",
            "A\r\n0123456789\r\n0\r\n\r\n",
            "a;x=\"y;z\"\r\n0123456789\r\n0;last\r\n\r\n",
            "1 \r\nx\r\n0\t \r\nA: 1\r\nB: 2\r\n\r\n",
            // A trailer line may hold a bare LF (hyper reads to its CR).
            "0\r\nA: 1\n2\r\n\r\n",
        ] {
            let seq = format!(
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{body}\
                 POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
            );
            assert_eq!(follow(&seq), (Some(2), false), "{body:?}");
        }
    }

    #[test]
    fn find_lf_finds_the_first_lf_anywhere() {
        for len in 0..40 {
            let mut bytes = vec![b'a'; len];
            assert_eq!(find_lf(&bytes), None);
            for at in 0..len {
                bytes.fill(0x8a);
                bytes[at] = b'\n';
                if at + 1 < len {
                    bytes[at + 1] = b'\n';
                }
                assert_eq!(find_lf(&bytes), Some(at), "{len} {at}");
            }
        }
    }

    #[test]
    fn a_huge_content_length_is_skipped_by_count() {
        let mut framing = RequestFraming::new();
        assert_eq!(
            framing.feed(b"POST / HTTP/1.1\r\nContent-Length: 18446744073709551613\r\n\r\n"),
            None
        );
        let body = [b'G'; 4096];
        for _ in 0..100 {
            assert_eq!(framing.feed(&body), None);
        }
        assert!(framing.is_following());
    }
}
