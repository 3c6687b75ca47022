//! (wired up once the readline module lands)
fn main() {}
