//! Fuzzes `Decoder::push`/`finish` in both formats. The first input byte picks the format and a
//! chunk size; the rest is fed in chunks of that size and must decode to the same events as a
//! single push (chunking must never change the result), without panicking.
#![no_main]

#[path = "../../src"]
#[allow(dead_code, unused_imports)]
mod src {
    pub mod decode;
}

use src::decode::{self, Decoder, Format};
use libfuzzer_sys::fuzz_target;

fn run(format: Format, data: &[u8], chunk: usize) -> Vec<decode::Event> {
    let mut d = Decoder::new(format);
    let mut ev = Vec::new();
    for c in data.chunks(chunk) {
        ev.extend(d.push(c));
    }
    ev.extend(d.finish());
    ev
}

fuzz_target!(|input: &[u8]| {
    let Some((&sel, data)) = input.split_first() else {
        return;
    };
    let format = if sel & 1 == 0 { Format::Text } else { Format::Json };
    let chunk = usize::from(sel >> 1) + 1;
    let whole = run(format, data, data.len().max(1));
    let chunked = run(format, data, chunk);
    assert_eq!(whole, chunked);
    let _ = decode::decode_json_string(data);
});
