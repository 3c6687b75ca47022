//! A forgiving byte-level lexer for the parts of the bpftrace language that the analysis needs.
//!
//! It never fails: anything it does not recognise becomes a one-byte [`Tok::Other`], so an
//! unknown construct (a newer syntax, a typo) can at worst hide a field name, never crash the
//! analysis or make an unsafe call invisible. Comments are skipped here once, so no later pass can
//! mistake `// system("x")` for a call.

/// A 1-based line and column (the column counts bytes), as bpftrace and compilers print them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Pos {
    pub line: u32,
    pub col: u32,
}

impl std::fmt::Display for Pos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

/// Maps byte offsets to [`Pos`]; built once per source.
pub(crate) struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    pub(crate) fn new(src: &[u8]) -> Self {
        let mut starts = vec![0];
        starts.extend(
            src.iter()
                .enumerate()
                .filter(|(_, &b)| b == b'\n')
                .map(|(i, _)| i + 1),
        );
        LineIndex { starts }
    }

    pub(crate) fn pos(&self, offset: usize) -> Pos {
        let line = match self.starts.binary_search(&offset) {
            Ok(i) => i,
            Err(i) => i - 1,
        };
        Pos {
            line: (line + 1) as u32,
            col: (offset - self.starts[line] + 1) as u32,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Tok {
    /// Identifier, keyword, builtin, `@map`, `@`, `$var` (sigil included).
    Ident(String),
    /// A number as written (`10`, `0x1f`, `1e6`, `1_000`).
    Num(String),
    /// A string literal with its escapes decoded to bytes.
    Str(Vec<u8>),
    /// Punctuation and operators (`(`, `->`, `==`, ...).
    Punct(&'static str),
    /// A byte the lexer does not know.
    Other(u8),
}

#[derive(Debug, Clone)]
pub(crate) struct Token {
    pub tok: Tok,
    pub start: usize,
    pub end: usize,
}

impl Token {
    pub(crate) fn is_punct(&self, p: &str) -> bool {
        matches!(&self.tok, Tok::Punct(q) if *q == p)
    }
    pub(crate) fn ident(&self) -> Option<&str> {
        match &self.tok {
            Tok::Ident(s) => Some(s),
            _ => None,
        }
    }
}

const PUNCTS: &[&str] = &[
    "<<=", ">>=", "->", "::", "==", "!=", "<=", ">=", "&&", "||", "<<", ">>", "++", "--", "+=",
    "-=", "*=", "/=", "%=", "&=", "|=", "^=", "=>", "(", ")", "{", "}", "[", "]", ",", ";", ":",
    ".", "+", "-", "*", "/", "%", "&", "|", "^", "!", "~", "<", ">", "=", "?",
];

/// Skips whitespace and comments from `i`; returns the new offset.
pub(crate) fn skip_trivia(src: &[u8], mut i: usize) -> usize {
    loop {
        while i < src.len() && src[i].is_ascii_whitespace() {
            i += 1;
        }
        if src[i..].starts_with(b"//") {
            while i < src.len() && src[i] != b'\n' {
                i += 1;
            }
        } else if src[i..].starts_with(b"/*") {
            i = match find(src, i + 2, b"*/") {
                Some(j) => j + 2,
                None => src.len(),
            };
        } else {
            return i;
        }
    }
}

fn find(src: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    src.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// Reads a string literal starting at the opening quote `src[i] == b'"'`.
/// Returns the decoded bytes and the offset after the closing quote (or the end of input when
/// the literal is unterminated).
pub(crate) fn read_string(src: &[u8], i: usize) -> (Vec<u8>, usize) {
    let mut out = Vec::new();
    let mut j = i + 1;
    while j < src.len() {
        match src[j] {
            b'"' => return (out, j + 1),
            b'\\' if j + 1 < src.len() => {
                let c = src[j + 1];
                j += 2;
                match c {
                    b'n' => out.push(b'\n'),
                    b't' => out.push(b'\t'),
                    b'r' => out.push(b'\r'),
                    b'"' => out.push(b'"'),
                    b'\\' => out.push(b'\\'),
                    b'x' => {
                        let digits: Vec<u8> = src[j..]
                            .iter()
                            .take(2)
                            .take_while(|b| b.is_ascii_hexdigit())
                            .copied()
                            .collect();
                        j += digits.len();
                        out.push(
                            u8::from_str_radix(std::str::from_utf8(&digits).unwrap_or("0"), 16)
                                .unwrap_or(0),
                        );
                    }
                    b'0'..=b'7' => {
                        let mut v: u32 = u32::from(c - b'0');
                        let mut n = 1;
                        while n < 3 && j < src.len() && (b'0'..=b'7').contains(&src[j]) {
                            v = v * 8 + u32::from(src[j] - b'0');
                            j += 1;
                            n += 1;
                        }
                        out.push((v & 0xff) as u8);
                    }
                    other => {
                        // bpftrace rejects unknown escapes; keep both bytes so nothing is lost.
                        out.push(b'\\');
                        out.push(other);
                    }
                }
            }
            b => {
                out.push(b);
                j += 1;
            }
        }
    }
    (out, src.len())
}

/// Lexes one token at `i` (which must not be trivia). Returns `None` at the end of input.
pub(crate) fn next_token(src: &[u8], i: usize) -> Option<Token> {
    let c = *src.get(i)?;
    let ident_start = |b: u8| b.is_ascii_alphabetic() || b == b'_';
    let ident_cont = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    if ident_start(c) || c == b'@' || c == b'$' {
        let mut j = i + 1;
        while j < src.len() && ident_cont(src[j]) {
            j += 1;
        }
        let text = String::from_utf8_lossy(&src[i..j]).into_owned();
        return Some(Token {
            tok: Tok::Ident(text),
            start: i,
            end: j,
        });
    }
    if c.is_ascii_digit() {
        let mut j = i + 1;
        while j < src.len() && (src[j].is_ascii_alphanumeric() || src[j] == b'_') {
            j += 1;
        }
        return Some(Token {
            tok: Tok::Num(String::from_utf8_lossy(&src[i..j]).into_owned()),
            start: i,
            end: j,
        });
    }
    if c == b'"' {
        let (bytes, j) = read_string(src, i);
        return Some(Token {
            tok: Tok::Str(bytes),
            start: i,
            end: j,
        });
    }
    for p in PUNCTS {
        if src[i..].starts_with(p.as_bytes()) {
            return Some(Token {
                tok: Tok::Punct(p),
                start: i,
                end: i + p.len(),
            });
        }
    }
    // Step over a whole UTF-8 sequence so a multi-byte character is one token.
    let len = match c {
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf7 => 4,
        _ => 1,
    };
    Some(Token {
        tok: Tok::Other(c),
        start: i,
        end: (i + len).min(src.len()),
    })
}

/// Lexes `src[from..to]` completely.
pub(crate) fn tokens(src: &[u8], from: usize, to: usize) -> Vec<Token> {
    let src = &src[..to.min(src.len())];
    let mut out = Vec::new();
    let mut i = from;
    loop {
        i = skip_trivia(src, i);
        match next_token(src, i) {
            Some(t) => {
                i = t.end;
                out.push(t);
            }
            None => return out,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_and_strings() {
        let src = br#"a /* x "y" */ b // system("z")
"q\"\\\n\x41\101" @m[1] $v->f"#;
        let toks: Vec<Tok> = tokens(src, 0, src.len())
            .into_iter()
            .map(|t| t.tok)
            .collect();
        assert_eq!(
            toks,
            vec![
                Tok::Ident("a".into()),
                Tok::Ident("b".into()),
                Tok::Str(b"q\"\\\nAA".to_vec()),
                Tok::Ident("@m".into()),
                Tok::Punct("["),
                Tok::Num("1".into()),
                Tok::Punct("]"),
                Tok::Ident("$v".into()),
                Tok::Punct("->"),
                Tok::Ident("f".into()),
            ]
        );
    }

    #[test]
    fn unterminated_input_does_not_panic() {
        for src in [&b"\"abc"[..], b"/* abc", b"\"\\", b"\"\\x", b"\xff\xe2"] {
            let _ = tokens(src, 0, src.len());
        }
    }

    #[test]
    fn positions() {
        let idx = LineIndex::new(b"ab\ncd\n");
        assert_eq!(idx.pos(0), Pos { line: 1, col: 1 });
        assert_eq!(idx.pos(4), Pos { line: 2, col: 2 });
        assert_eq!(idx.pos(6), Pos { line: 3, col: 1 });
    }
}
