//! The gRPC types and client stub generated at build time from `proto/immudb/schema.proto`
//! (our own subset of immudb's `immudb.schema` package). Kept in its own module so the rest of
//! the crate converts prost types into plain Rust types at one boundary ([`super::client`]).

#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("immudb.schema");
