//! A verified immudb client: every write and read is checked against immudb's own
//! cryptographic proofs and a trusted state kept on disk.

pub mod client;
pub mod proof;
pub mod proto;
pub mod server;
pub mod state;
