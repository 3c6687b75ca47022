//! Errors as one line for people.

use std::error::Error;

/// An error and its causes on one line, each message once. Many errors (tonic's, and ours
/// that say `{context}: {source}`) repeat their source in their own message, so printing the
/// chain as it is says things twice ("transport error: transport error: ...").
pub fn one_line(err: &(dyn Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(err);
    while let Some(cause) = cur {
        let msg = cause.to_string();
        if !parts.iter().any(|p| p.ends_with(&msg)) {
            parts.push(msg);
        }
        cur = cause.source();
    }
    parts.join(": ")
}
